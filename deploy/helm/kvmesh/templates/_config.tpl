{{/*
node.toml of a worker ("worker") or an edge node ("edge"). Keys: docs/configuration.md.
Called with (dict "root" $ "role" "worker").
*/}}
{{- define "kvmesh.nodeToml" -}}
{{- $v := .root.Values -}}
{{- if eq .role "edge" -}}
role = "edge"
{{ end -}}
http_addr = "0.0.0.0:{{ int $v.ports.http }}"
log_format = {{ $v.config.logFormat | quote }}
routing = {{ $v.config.routing | quote }}
cluster_id = {{ $v.config.clusterId | quote }}
quic_addr = "0.0.0.0:{{ int $v.ports.quic }}"
# The headless Service: every kvmesh pod of this release, ready or not.
seeds = ["{{ include "kvmesh.meshService" .root }}:{{ int $v.ports.quic }}"]
{{- if eq .role "edge" }}
# Issued to this pod by cert-manager's csi-driver, for its pod name.
ca = "/etc/kvmesh/certs/ca.crt"
cert = "/etc/kvmesh/certs/tls.crt"
key = "/etc/kvmesh/certs/tls.key"
{{- else }}
# ca.crt, NAME.crt and NAME.key, NAME = node_name = the pod name.
tls_dir = "/etc/kvmesh/certs"
{{- end }}
{{- with $v.config.extraTopLevel }}
{{ trim . }}
{{- end }}
{{- if $v.auth.existingSecret }}

[auth]
keys_file = "/etc/kvmesh/auth/{{ $v.auth.secretKey }}"
protect_metrics = {{ $v.auth.protectMetrics }}
reload_interval_ms = {{ int $v.auth.reloadIntervalMs }}
{{- end }}
{{- if and (eq .role "worker") (eq $v.profile "sim") }}

# No [[engines]]: the node starts the embedded vLLM simulator on loopback.
[embedded]
model = {{ $v.sim.model | quote }}
num_gpu_blocks = {{ int $v.sim.numGpuBlocks }}
{{- else if eq .role "worker" }}

# vLLM in the same pod, on loopback.
[[engines]]
name = "vllm"
url = "http://127.0.0.1:{{ int $v.vllm.port }}"
kv_events = "tcp://127.0.0.1:{{ int $v.vllm.kvEventsPort }}"
kv_events_replay = "tcp://127.0.0.1:{{ int $v.vllm.kvEventsReplayPort }}"
{{- end }}
{{- if eq $v.profile "vllm" }}

# Prefix matching needs the model's tokenizer, downloaded by the pod's init container.
[[models]]
name = {{ $v.vllm.model | quote }}
tokenizer = "/models/model"
{{- end }}
{{- with $v.config.extraTables }}

{{ trim . }}
{{- end }}
{{- end }}
