-- Argo CD health of a LoRAJob (sd-operator.dev/v1alpha1). GenerationBatch/health.lua has the same rules.
-- Argo CD runs this without the string library (useOpenLibs is off), so only `..` and tostring are used.
local hs = {status = "Progressing"}
local gen = obj.metadata.generation
local st = obj.status
-- Until the operator has written a status for the current spec, the phase describes an older spec.
if st == nil or st.observedGeneration == nil or (gen ~= nil and st.observedGeneration < gen) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(gen or 1)
  return hs
end
local phase = st.phase
local detail = ""
if st.message ~= nil and st.message ~= "" then
  detail = ": " .. st.message
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded" .. detail
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed" .. detail
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended" .. detail
elseif obj.spec ~= nil and obj.spec.suspend == true then
  -- Suspend was asked for and observed, but the running pod has not stopped yet.
  hs.status = "Suspended"
  hs.message = "Suspend requested, still " .. tostring(phase)
elseif phase == nil then
  hs.message = "Waiting for the operator to report a phase"
else
  hs.message = tostring(phase) .. detail
end
return hs
