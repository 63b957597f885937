{{/* Chart name, for labels. */}}
{{- define "kvmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix. Worker pods are FULLNAME-N and each one's node name and certificate name
is its pod name, so it must stay a DNS label with room for "-N" and "-tls" (at most 52).
*/}}
{{- define "kvmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kvmesh.labels" -}}
helm.sh/chart: {{ include "kvmesh.chart" . }}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvmesh
{{- end }}

{{/* Labels every kvmesh pod of this release carries (workers and edges). */}}
{{- define "kvmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvmesh.workerSelectorLabels" -}}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "kvmesh.edgeSelectorLabels" -}}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/component: edge
{{- end }}

{{- define "kvmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "kvmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "kvmesh.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The headless Service: the seed list (every pod, ready or not) and the scrape target. */}}
{{- define "kvmesh.meshService" -}}
{{- printf "%s-mesh" (include "kvmesh.fullname" .) }}
{{- end }}

{{/* Node certificates are made for ordinals 0..count-1. */}}
{{- define "kvmesh.certCount" -}}
{{- $n := int .Values.certificates.certManager.count }}
{{- if eq $n 0 }}{{ $n = int .Values.replicaCount }}{{ end }}
{{- if lt $n (int .Values.replicaCount) }}
{{- fail (printf "certificates.certManager.count (%d) is below replicaCount (%d): pods past it would have no certificate" $n (int .Values.replicaCount)) }}
{{- end }}
{{- $n }}
{{- end }}

{{/* The issuer of node certificates: the chart's CA Issuer, or certificates.certManager.issuerRef. */}}
{{- define "kvmesh.issuerRef" -}}
{{- if .Values.certificates.certManager.createCA -}}
name: {{ include "kvmesh.fullname" . }}-ca
kind: Issuer
group: cert-manager.io
{{- else -}}
{{- if not .Values.certificates.certManager.issuerRef.name }}
{{- fail "certificates.certManager.createCA is false: set certificates.certManager.issuerRef.name" }}
{{- end -}}
name: {{ .Values.certificates.certManager.issuerRef.name }}
kind: {{ .Values.certificates.certManager.issuerRef.kind }}
group: {{ .Values.certificates.certManager.issuerRef.group }}
{{- end }}
{{- end }}

{{/* Whether a CRD-backed monitoring object renders: auto follows the cluster's capabilities. */}}
{{- define "kvmesh.monitoringOn" -}}
{{- $v := toString .enabled }}
{{- if eq $v "true" }}true
{{- else if and (eq $v "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true
{{- end }}
{{- end }}

{{/* The node.toml checksum, so that a config change rolls the pods. */}}
{{- define "kvmesh.configChecksum" -}}
{{- include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
