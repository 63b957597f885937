{{/*
The kvmesh container, for a worker or an edge pod. Called with (dict "root" $ "role" "worker").
*/}}
{{- define "kvmesh.container" -}}
{{- $v := .root.Values -}}
- name: kvmesh
  image: {{ include "kvmesh.image" .root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["serve", "--config", "/etc/kvmesh/config/{{ if eq .role "edge" }}edge{{ else }}node{{ end }}.toml"]
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    # The node name is the pod name: it names the node's certificate, which kvmesh checks.
    - name: KVMESH_NODE_NAME
      value: $(POD_NAME)
    # Peers dial the pod IP.
    - name: KVMESH_ADVERTISE_ADDR
      value: $(POD_IP):{{ int $v.ports.quic }}
    - name: RUST_LOG
      value: {{ $v.config.logLevel | quote }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ int $v.ports.http }}
      protocol: TCP
    - name: quic
      containerPort: {{ int $v.ports.quic }}
      protocol: UDP
  # Keeps serving while Services drop the pod, then SIGTERM drains the node.
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ int $v.preStopSleepSeconds }}"]
  # /version answers as soon as the HTTP server is up (after the tokenizers are loaded).
  startupProbe:
    httpGet:
      path: /version
      port: http
    {{- toYaml $v.probes.startup | nindent 4 }}
  # Ready while this node can serve, from its own engine or a peer's; not while it drains.
  readinessProbe:
    httpGet:
      path: /health
      port: http
    {{- toYaml $v.probes.readiness | nindent 4 }}
  # Alive while the HTTP server answers. Not /health: it fails while the engine loads or is
  # down, and restarting kvmesh would not help.
  livenessProbe:
    httpGet:
      path: /version
      port: http
    {{- toYaml $v.probes.liveness | nindent 4 }}
  resources:
    {{- toYaml (ternary $v.edge.resources $v.resources (eq .role "edge")) | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/kvmesh/config
      readOnly: true
    - name: certs
      mountPath: /etc/kvmesh/certs
      readOnly: true
    {{- if $v.auth.existingSecret }}
    - name: auth
      mountPath: /etc/kvmesh/auth
      readOnly: true
    {{- end }}
    {{- if eq $v.profile "vllm" }}
    - name: models
      mountPath: /models
      readOnly: true
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Volumes every kvmesh pod has besides its certificates. */}}
{{- define "kvmesh.commonVolumes" -}}
{{- $v := .Values -}}
- name: config
  configMap:
    name: {{ include "kvmesh.fullname" . }}-config
{{- if $v.auth.existingSecret }}
# The API keys file; a Secret volume (no subPath) follows updates, and kvmesh re-reads the file.
- name: auth
  secret:
    secretName: {{ $v.auth.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.auth.secretKey }}
        path: {{ $v.auth.secretKey }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Downloads the model (or, with "tokenizerOnly", its tokenizer files) into /models/model.
Called with (dict "root" $ "tokenizerOnly" false).
*/}}
{{- define "kvmesh.fetchModel" -}}
{{- $v := .root.Values -}}
- name: fetch-model
  image: "{{ $v.vllm.image.repository }}:{{ $v.vllm.image.tag }}"
  imagePullPolicy: {{ $v.vllm.image.pullPolicy }}
  command: ["python3", "-c"]
  args:
    - |
      import os
      from huggingface_hub import snapshot_download
      if os.path.exists("/models/model/config.json") and os.environ["ONLY_TOKENIZER"] != "1":
          print("model present in /models/model: not downloaded")
      else:
          patterns = ["*.json", "*.jinja", "*.model", "*.txt", "tokenizer*"] if os.environ["ONLY_TOKENIZER"] == "1" else None
          snapshot_download(os.environ["MODEL"], local_dir="/models/model", allow_patterns=patterns)
  env:
    - name: MODEL
      value: {{ $v.vllm.model | quote }}
    - name: ONLY_TOKENIZER
      value: {{ ternary "1" "0" .tokenizerOnly | quote }}
    - name: HF_HOME
      value: /models/.hf
    {{- if $v.vllm.hfTokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $v.vllm.hfTokenSecret }}
          key: token
          optional: true
    {{- end }}
  resources:
    {{- toYaml $v.vllm.downloadResources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
{{- end }}
