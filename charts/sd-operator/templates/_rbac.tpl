{{/* ---------------------------------------------------------------------------------------------
The operator's permissions, least privilege: exactly what the controllers, kopf and the per-batch
Roles need. No wildcards. Rules for namespaced objects; a ClusterRole or a Role in each watched
namespace holds them.
--------------------------------------------------------------------------------------------- */}}
{{- define "sd-operator.operatorRules" -}}
# The custom resources: watched, annotated by kopf (progress, last-handled configuration).
- apiGroups: [sd-operator.dev]
  resources: [sdinstances, lorajobs]
  verbs: [get, list, watch, patch]
# GenerationBatches: a LoRAJob creates its evaluation batch; a finished batch goes with its Job's TTL.
- apiGroups: [sd-operator.dev]
  resources: [generationbatches]
  verbs: [get, list, watch, create, patch, delete]
# Status writes; get+patch on the batch and LoRAJob status also lets the operator grant them to the
# per-batch and per-LoRAJob Roles it creates (RBAC escalation check).
- apiGroups: [sd-operator.dev]
  resources: [sdinstances/status, lorajobs/status, generationbatches/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement, e.g. OpenShift).
- apiGroups: [sd-operator.dev]
  resources: [sdinstances/finalizers, lorajobs/finalizers, generationbatches/finalizers]
  verbs: [update]
# WebUI and training pods: watched for the status (never changed).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Children applied server-side (create + patch); Jobs are also watched.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# The SDInstances' children (Deployments, Services, NetworkPolicies, ConfigMaps) are also watched: one
# deleted by hand is applied again at once.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch]
# delete: an instance Service an earlier operator made with a ClusterIP is made again headless.
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
# ConfigMaps: the WebUI settings it applies, and the gateways' demand reports it watches (autoscaling).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch]
# The runner's and trainer's Roles (patch of one batch's or LoRAJob's status) and their bindings.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
# Events of the controllers and of kopf.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- if and (not .Values.operator.standalone) (include "sd-operator.namespaced" .) }}
# kopf peering in each watched namespace (namespaced mode): one active replica.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, create, patch]
{{- end }}
{{- end }}

{{/* Cluster-scoped reads kopf needs in any mode: CRDs (resource scanning), Namespaces (namespace
scanning); and the ClusterKopfPeering when the operator watches the whole cluster. */}}
{{- define "sd-operator.operatorClusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- if and (not .Values.operator.standalone) (not (include "sd-operator.namespaced" .)) }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, create, patch]
{{- end }}
{{- end }}

{{/* The gateway reads what its discovery and the console need, nothing else. */}}
{{- define "sd-operator.gatewayRules" -}}
# Discovery: which model each SDInstance serves, and its ready endpoints.
- apiGroups: [sd-operator.dev]
  resources: [sdinstances]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
{{- if .Values.gateway.console.watch }}
# The web console: batch and training progress, and which store a batch's gallery is read from.
- apiGroups: [sd-operator.dev]
  resources: [generationbatches, lorajobs]
  verbs: [get, list, watch]
{{- end }}
{{- if .Values.gateway.console.readS3Secrets }}
# The S3 credentials a batch names (spec.output.s3.credentialsSecret), read one by one, never listed.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- end }}

{{/* The gateway's demand report (--report-demand), in the release namespace only. */}}
{{- define "sd-operator.gatewayDemandRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update, patch, delete]
{{- end }}
