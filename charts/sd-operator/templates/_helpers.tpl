{{/* ---------------------------------------------------------------------------------------------
Names
--------------------------------------------------------------------------------------------- */}}

{{- define "sd-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-sd-operator, or the release name alone when it already contains the chart name. */}}
{{- define "sd-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sd-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names of the components (the operator's objects use the full name itself). */}}
{{- define "sd-operator.operatorName" -}}
{{- include "sd-operator.fullname" . }}
{{- end }}

{{- define "sd-operator.gatewayName" -}}
{{- printf "%s-gateway" (include "sd-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "sd-operator.redisName" -}}
{{- printf "%s-redis" (include "sd-operator.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------
Labels. Call with (dict "ctx" $ "component" "operator").
--------------------------------------------------------------------------------------------- */}}

{{- define "sd-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sd-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "sd-operator.labels" -}}
helm.sh/chart: {{ include "sd-operator.chart" .ctx }}
{{ include "sd-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: sd-operator
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------
Images
--------------------------------------------------------------------------------------------- */}}

{{/* registry/repository:tag or @digest, from an image values block: (dict "image" .Values.image "default" tag). */}}
{{- define "sd-operator.imageRef" -}}
{{- $repo := .image.repository }}
{{- if .image.registry }}{{ $repo = printf "%s/%s" .image.registry .image.repository }}{{ end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString (default .default .image.tag)) }}
{{- end }}
{{- end }}

{{- define "sd-operator.image" -}}
{{- include "sd-operator.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{- define "sd-operator.redisImage" -}}
{{- include "sd-operator.imageRef" (dict "image" .Values.redis.image "default" "7.0.15-alpine") }}
{{- end }}

{{- define "sd-operator.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------
Security
--------------------------------------------------------------------------------------------- */}}

{{- define "sd-operator.podSecurityContext" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "sd-operator.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* The scratch space every read-only container gets. */}}
{{- define "sd-operator.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/* ---------------------------------------------------------------------------------------------
Settings derived from several values
--------------------------------------------------------------------------------------------- */}}

{{/* "true" when the operator and the gateway watch only operator.watchNamespaces. */}}
{{- define "sd-operator.namespaced" -}}
{{- if .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{- define "sd-operator.peeringName" -}}
{{- default (include "sd-operator.fullname" .) .Values.operator.peeringName }}
{{- end }}

{{- define "sd-operator.gatewayUrl" -}}
{{- if .Values.operator.gatewayUrl }}
{{- .Values.operator.gatewayUrl }}
{{- else if .Values.gateway.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "sd-operator.gatewayName" .) .Release.Namespace (int .Values.gateway.service.port) }}
{{- end }}
{{- end }}

{{/* "true" when the gateway checks API keys. */}}
{{- define "sd-operator.authEnabled" -}}
{{- if or .Values.gateway.auth.existingSecret .Values.gateway.auth.keys }}true{{ end }}
{{- end }}

{{- define "sd-operator.keysSecretName" -}}
{{- default (printf "%s-keys" (include "sd-operator.gatewayName" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/* The presets file of the gateway, in the format of the gateway's presets.yaml. */}}
{{- define "sd-operator.presetsYaml" -}}
{{- if .Values.gateway.presets }}
{{- toYaml (dict "presets" .Values.gateway.presets) }}
{{- else }}
# No extra presets: the gateway's built-in presets apply.
presets: {}
{{- end }}
{{- end }}

{{/* The cache URL argument of the gateway; empty: in-memory cache. */}}
{{- define "sd-operator.cacheUrlArg" -}}
{{- if .Values.redis.enabled }}
{{- printf "--cache-url=redis://%s.%s.svc:6379/0" (include "sd-operator.redisName" .) .Release.Namespace }}
{{- else if .Values.redis.external.existingSecret }}
{{- print "--cache-url=$(SD_CACHE_URL)" }}
{{- else if .Values.redis.external.url }}
{{- printf "--cache-url=%s" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Settings that contradict each other fail the rendering with a message naming them. */}}
{{- define "sd-operator.validate" -}}
{{- if and (not .Values.rbac.clusterWide) (not .Values.operator.watchNamespaces) }}
{{- fail "rbac.clusterWide=false needs operator.watchNamespaces: namespaced RBAC is granted in the watched namespaces" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "set either redis.enabled or redis.external (url or existingSecret), not both" }}
{{- end }}
{{- if and .Values.redis.external.url .Values.redis.external.existingSecret }}
{{- fail "set either redis.external.url or redis.external.existingSecret, not both" }}
{{- end }}
{{- if and .Values.gateway.auth.existingSecret .Values.gateway.auth.keys }}
{{- fail "set either gateway.auth.existingSecret or gateway.auth.keys, not both" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------
Custom resources rendered from values: (dict "ctx" $ "kind" "SDInstance" "item" .)
--------------------------------------------------------------------------------------------- */}}

{{- define "sd-operator.customResource" -}}
apiVersion: sd-operator.dev/v1alpha1
kind: {{ .kind }}
metadata:
  name: {{ .item.name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "sd-operator.labels" (dict "ctx" .ctx "component" "workload") | nindent 4 }}
    {{- with .item.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Argo CD: after the CRDs (wave 0), and no dry run against a CRD that the same sync creates.
    argocd.argoproj.io/sync-wave: "1"
    argocd.argoproj.io/sync-options: SkipDryRunOnMissingResource=true
    {{- with .item.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- toYaml .item.spec | nindent 2 }}
{{- end }}
