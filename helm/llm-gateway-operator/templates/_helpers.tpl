{{/* The chart's name, or nameOverride. */}}
{{- define "llmgw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (the release name alone when it contains the chart's), or fullnameOverride. */}}
{{- define "llmgw.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "llmgw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pod: never change them (a Deployment's selector is immutable). */}}
{{- define "llmgw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmgw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the chart (the CRD keeps the labels of crds/). */}}
{{- define "llmgw.labels" -}}
helm.sh/chart: {{ include "llmgw.chart" . }}
{{ include "llmgw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-gateway
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "llmgw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmgw.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository:tag, or repository@digest. */}}
{{- define "llmgw.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The proxies' default image. */}}
{{- define "llmgw.proxyImage" -}}
{{- default (printf "ghcr.io/llm-gateway/llmgw-proxy:%s" .Chart.AppVersion) .Values.proxyImage }}
{{- end }}

{{/* Rules between values that the schema cannot say clearly; a failure names the values. */}}
{{- define "llmgw.validate" -}}
{{- if and (eq .Values.rbac.scope "namespace") (empty .Values.watchNamespaces) }}
{{- fail "rbac.scope is namespace: list the namespaces to serve in watchNamespaces (at least one)" }}
{{- end }}
{{- if and (eq .Values.rbac.scope "cluster") (not (empty .Values.watchNamespaces)) }}
{{- fail (printf "rbac.scope is cluster, so the operator serves every namespace: leave watchNamespaces empty (it is %s), or set rbac.scope: namespace" (toJson .Values.watchNamespaces)) }}
{{- end }}
{{- end }}

{{/* The proxies' metrics endpoint, shared by the PodMonitor and the ServiceMonitor. */}}
{{- define "llmgw.metricsEndpoint" -}}
- port: metrics
  path: /metrics
  {{- with .interval }}
  interval: {{ . }}
  {{- end }}
  {{- with .scrapeTimeout }}
  scrapeTimeout: {{ . }}
  {{- end }}
{{- end }}

{{/* Which namespaces the monitors look in: the served ones, or all. */}}
{{- define "llmgw.monitorNamespaceSelector" -}}
{{- if eq .Values.rbac.scope "namespace" }}
matchNames:
  {{- toYaml .Values.watchNamespaces | nindent 2 }}
{{- else }}
any: true
{{- end }}
{{- end }}

{{/*
What the operator does in a namespace it serves, and nothing more (see the README's operator section):
- LLMGateways: kopf lists and watches them and patches its bookkeeping annotations; the reconciler reads
  them and merge-patches their status.
- Secrets: watched and read only to check that a referenced Secret and key exist (never copied).
- ConfigMaps, Services, ServiceAccounts, Deployments, PodDisruptionBudgets of each gateway: watched,
  read and written with server-side apply: a PATCH, which the API server also authorizes as `create`
  when the object does not exist yet. The PodDisruptionBudget is deleted when a gateway goes down to one
  replica; the other children go with their gateway, through owner references.
- Pods: listed, to find the ready proxies a migration reads.
- Events: created on the gateways.
*/}}
{{- define "llmgw.namespacedRules" -}}
- apiGroups: [llmgateway.io]
  resources: [llmgateways]
  verbs: [get, list, watch, patch]
- apiGroups: [llmgateway.io]
  resources: [llmgateways/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* kopf finds the resources it serves by listing and watching CustomResourceDefinitions. */}}
{{- define "llmgw.crdRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
