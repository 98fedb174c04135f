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

{{- define "rlops.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
