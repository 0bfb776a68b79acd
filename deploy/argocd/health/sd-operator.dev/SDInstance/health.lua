-- Argo CD health of an SDInstance (sd-operator.dev/v1alpha1).
-- Argo CD runs this without the string library (useOpenLibs is off), so only `..` and tostring are used.
local hs = {status = "Progressing"}
local gen = obj.metadata.generation
local st = obj.status
-- Until the operator has written a status for the current spec, the phase describes an older spec.
if st == nil or st.observedGeneration == nil or (gen ~= nil and st.observedGeneration < gen) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(gen or 1)
  return hs
end
-- No pods are wanted, so none being ready is the desired state, whatever pods are still shutting down.
-- With spec.autoscaling, spec.replicas is ignored: the operator's status says whether pods are wanted.
if obj.spec ~= nil and obj.spec.replicas == 0 and obj.spec.autoscaling == nil then
  hs.status = "Healthy"
  hs.message = "Scaled to zero"
  return hs
end
local phase = st.phase
local detail = ""
if st.message ~= nil and st.message ~= "" then
  detail = ": " .. st.message
end
local readyReason = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Ready" then
      readyReason = c.reason
    end
  end
end
if phase == "Ready" and readyReason == "ScaledToZero" then
  -- spec.autoscaling with minReplicas 0 and no demand: asleep as intended; a request wakes it.
  hs.status = "Healthy"
  hs.message = "Scaled to zero"
elseif phase == "Ready" then
  hs.status = "Healthy"
  hs.message = tostring(st.readyReplicas or 0) .. "/" .. tostring(st.replicas or 0) .. " replicas ready"
elseif phase == "Pending" or phase == "Downloading" or phase == "Loading" then
  hs.message = phase .. detail
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = phase .. detail
elseif phase == nil then
  hs.message = "Waiting for the operator to report a phase"
else
  -- A phase added by a newer operator: not alarming, but not known to be good either.
  hs.message = "Unknown phase " .. tostring(phase) .. detail
end
return hs
