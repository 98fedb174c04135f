{{/* The operator's names are fixed: its ServiceAccount name and namespace are written into the
ValidatingAdmissionPolicies (only that user creates TrainingRuns and Rollouts) and into the
operator itself. */}}
{{- define "rlops.checkNamespace" -}}
{{- if ne .Release.Namespace "rlops-system" -}}
{{- fail (printf "install rlops into the namespace rlops-system (helm install -n rlops-system --create-namespace), not %q: the admission policies and the operator name its ServiceAccount there" .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "rlops.labels" -}}
app.kubernetes.io/name: rlops-operator
app.kubernetes.io/part-of: rlops
{{- end -}}

{{/* Serve's REST API: the KubeRay RayCluster's head Service when the chart makes one, else
ray.dashboardUrl. */}}
{{- define "rlops.rayNamespace" -}}
{{ .Values.ray.kuberay.namespace | default .Release.Namespace }}
{{- end -}}

{{- define "rlops.rayDashboardUrl" -}}
{{- if .Values.ray.kuberay.enabled -}}
http://{{ .Values.ray.kuberay.name }}-head-svc.{{ include "rlops.rayNamespace" . }}.svc:8265
{{- else -}}
{{ .Values.ray.dashboardUrl }}
{{- end -}}
{{- end -}}

{{- define "rlops.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
