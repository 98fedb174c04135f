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

{{/* The Ray cluster's namespace, for the NetworkPolicy that guards its dashboard: the value
networkPolicy.ray.namespace, else KubeRay's namespace, else the namespace in the dashboard URL
(http://<service>.<namespace>.svc...); empty when none of these names one. */}}
{{- define "rlops.rayPolicyNamespace" -}}
{{- if .Values.networkPolicy.ray.namespace -}}
{{ .Values.networkPolicy.ray.namespace }}
{{- else if .Values.ray.kuberay.enabled -}}
{{ include "rlops.rayNamespace" . }}
{{- else -}}
{{- $host := (urlParse .Values.ray.dashboardUrl).host | splitList ":" | first -}}
{{- if regexMatch "^[a-z0-9-]+\\.[a-z0-9-]+\\.svc(\\..*)?$" $host -}}
{{ index (splitList "." $host) 1 }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rlops.rayDashboardUrl" -}}
{{- if .Values.ray.kuberay.enabled -}}
http://{{ .Values.ray.kuberay.name }}-head-svc.{{ include "rlops.rayNamespace" . }}.svc:8265
{{- else -}}
{{ .Values.ray.dashboardUrl }}
{{- end -}}
{{- end -}}

{{/* The image of the operator's evaluation Jobs: by digest when evaluation.image.digest is set. */}}
{{- define "rlops.evaluatorImage" -}}
{{- $image := .Values.evaluation.image -}}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "rlops.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The operators to run: one for every namespace, or one per entry of `shards` (each with
its namespaces and its own Ray cluster). A YAML list of {name, suffix, namespaces,
rayDashboardUrl}; the suffix goes after "rlops-operator" and "rlops-webhook-tls". */}}
{{- define "rlops.shards" -}}
{{- if .Values.shards -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- fail "shards: each shard runs one operator (replicas: 1); a standby per shard is not supported yet" -}}
{{- end -}}
{{- if .Values.ray.kuberay.enabled -}}
{{- fail "shards: give each shard its rayDashboardUrl (ray.kuberay.enabled makes one Ray cluster, and two shards must never write the same Serve config)" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $shard := .Values.shards -}}
{{- range $ns := $shard.namespaces -}}
{{- if hasKey $seen $ns -}}
{{- fail (printf "shards: namespace %q is listed by shards %q and %q: each namespace belongs to one shard" $ns (get $seen $ns) $shard.name) -}}
{{- end -}}
{{- $_ := set $seen $ns $shard.name -}}
{{- end -}}
{{- end -}}
{{- $urls := dict -}}
{{- range .Values.shards -}}
{{- if hasKey $urls .rayDashboardUrl -}}
{{- fail (printf "shards: %q and %q have the same rayDashboardUrl %s: each shard needs a Ray cluster of its own" (get $urls .rayDashboardUrl) .name .rayDashboardUrl) -}}
{{- end -}}
{{- $_ := set $urls .rayDashboardUrl .name -}}
{{- end -}}
{{- range .Values.shards }}
- name: {{ .name }}
  suffix: "-{{ .name }}"
  namespaces: {{ .namespaces | toJson }}
  rayDashboardUrl: {{ .rayDashboardUrl | quote }}
{{- end }}
{{- else }}
- name: ""
  suffix: ""
  namespaces: []
  rayDashboardUrl: {{ include "rlops.rayDashboardUrl" . | quote }}
{{- end -}}
{{- end -}}

{{/* The MutatingWebhookConfigurations the operators manage: rlops.dev (the single operator's;
shards delete it when they start, since it would send their Rollouts to an operator they
replace), and one per shard. */}}
{{- define "rlops.webhookConfigurations" -}}
rlops.dev
{{- range .Values.shards }}, {{ .name }}.rlops.dev{{ end -}}
{{- end -}}

{{/* The webhook certificates' Secrets (one per shard). */}}
{{- define "rlops.webhookSecrets" -}}
{{- if .Values.shards -}}
{{- range $i, $s := .Values.shards }}{{ if $i }}, {{ end }}rlops-webhook-tls-{{ $s.name }}{{ end -}}
{{- else -}}
rlops-webhook-tls
{{- end -}}
{{- end -}}
