{{/* Chart name, overridable with nameOverride. */}}
{{- define "iamlet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name when it already contains the chart name. */}}
{{- define "iamlet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "iamlet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iamlet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iamlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "iamlet.labels" -}}
{{ include "iamlet.selectorLabels" . }}
helm.sh/chart: {{ include "iamlet.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The ServiceAccount the pods run as (kube2iam's rbac.serviceAccountName still works). */}}
{{- define "iamlet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "iamlet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default .Values.rbac.serviceAccountName .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "iamlet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/* Where /metrics is served: prometheus.metricsPort, else the app port (as kube2iam). */}}
{{- define "iamlet.metricsPort" -}}
{{- default .Values.host.port .Values.prometheus.metricsPort -}}
{{- end -}}
