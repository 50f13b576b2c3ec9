{{/*
Name of the chart, truncated to a DNS label.
*/}}
{{- define "llmservice-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name when it already contains the chart name,
else "<release>-<chart>".
*/}}
{{- define "llmservice-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Labels on every object of the release.
*/}}
{{- define "llmservice-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llmservice-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmservice
{{- end }}

{{/*
Labels that select the operator pods.
*/}}
{{- define "llmservice-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmservice-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "llmservice-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmservice-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference.
*/}}
{{- define "llmservice-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The default inference server image written into LLMSERVICE_OPERATOR_SERVER_IMAGE.
*/}}
{{- define "llmservice-operator.serverImage" -}}
{{- default (printf "ghcr.io/llmservice/llmservice-server:%s" .Chart.AppVersion) .Values.serverImage }}
{{- end }}

{{/*
RBAC rules on namespaced resources, shared by the ClusterRole (all namespaces) and the Role in
each watched namespace. See docs/security.md for why each one is needed.
*/}}
{{- define "llmservice-operator.namespacedRules" -}}
- apiGroups: ["llmservice.io"]
  resources: ["llmservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llmservice.io"]
  resources: ["llmservices/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "podmonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
RBAC rules on cluster-scoped resources kopf reads at startup.
*/}}
{{- define "llmservice-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
The GPU type node label: a preset name (gpu-operator, gke, eks-karpenter) or a label key.
*/}}
{{- define "llmservice-operator.gpuTypeLabel" -}}
{{- $presets := dict "gpu-operator" "nvidia.com/gpu.product" "gke" "cloud.google.com/gke-accelerator" "eks-karpenter" "karpenter.k8s.aws/instance-gpu-name" -}}
{{- get $presets .Values.gpuTypeLabel | default .Values.gpuTypeLabel -}}
{{- end }}
