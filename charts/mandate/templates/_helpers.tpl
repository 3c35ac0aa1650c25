{{/* Names. */}}
{{- define "mandate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mandate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's Deployment, Service, ServiceAccount, roles and Lease. */}}
{{- define "mandate.operator" -}}
{{- printf "%s-operator" (include "mandate.fullname" .) }}
{{- end }}

{{- define "mandate.serviceAccountName" -}}
{{- default (include "mandate.operator" .) .Values.serviceAccount.name }}
{{- end }}

{{/* Webhook configurations (one mutating, one validating, same name). */}}
{{- define "mandate.webhookConfiguration" -}}
{{- include "mandate.fullname" . }}
{{- end }}

{{/* Secrets and ConfigMaps the operator writes. */}}
{{- define "mandate.webhookSecret" -}}
{{- if eq .Values.webhook.certificate.source "operator" }}
{{- printf "%s-webhook-tls" (include "mandate.fullname" .) }}
{{- else }}
{{- default (printf "%s-webhook-cert" (include "mandate.fullname" .)) .Values.webhook.certificate.secretName }}
{{- end }}
{{- end }}

{{- define "mandate.caSecret" -}}
{{- printf "%s-spiffe-ca" (include "mandate.fullname" .) }}
{{- end }}

{{- define "mandate.trustBundle" -}}
{{- printf "%s-trust-bundle" (include "mandate.fullname" .) }}
{{- end }}

{{- define "mandate.injectConfig" -}}
{{- printf "%s-inject" (include "mandate.fullname" .) }}
{{- end }}

{{- define "mandate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of everything the chart makes (the CRDs carry only these). */}}
{{- define "mandate.commonLabels" -}}
helm.sh/chart: {{ include "mandate.chart" . }}
app.kubernetes.io/name: {{ include "mandate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mandate
{{- end }}

{{/* Labels of the operator's objects. */}}
{{- define "mandate.labels" -}}
{{ include "mandate.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mandate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mandate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Images. */}}
{{- define "mandate.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}

{{/* Service DNS names (certificates, URLs). */}}
{{- define "mandate.serviceHost" -}}
{{- printf "%s.%s.svc" (include "mandate.operator" .) .Release.Namespace }}
{{- end }}

{{- define "mandate.serviceNames" -}}
{{- $svc := include "mandate.operator" . }}
{{- $names := list $svc (printf "%s.%s" $svc .Release.Namespace) (include "mandate.serviceHost" .) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.clusterDomain) }}
{{- if .Values.service.clusterIP }}
{{- $names = append $names .Values.service.clusterIP }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{- define "mandate.svidServerURL" -}}
{{- default (printf "https://%s:9444" (include "mandate.serviceHost" .)) .Values.identity.svidServerURL }}
{{- end }}

{{- define "mandate.policyServerURL" -}}
{{- default (printf "https://%s:9445" (include "mandate.serviceHost" .)) .Values.identity.policyServerURL }}
{{- end }}

{{/* Whether the operator patches caBundle (and so needs RBAC on the webhook configurations). */}}
{{- define "mandate.patchCABundle" -}}
{{- if or (ne .Values.webhook.certificate.source "certManager") .Values.webhook.certificate.patchCABundle }}true{{ end }}
{{- end }}

{{/* The pod webhooks' namespaceSelector: opted-in namespaces, never kube-system or
the release namespace. kubernetes.io/metadata.name is set on every namespace only
from Kubernetes 1.21; before that the mandate.dev/enforce requirement is what keeps
them out (do not label them). */}}
{{- define "mandate.podNamespaceSelector" -}}
matchExpressions:
  - key: mandate.dev/enforce
    operator: In
    values: ["true"]
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- $exempt := concat (list "kube-system" .Release.Namespace) .Values.webhook.exemptNamespaces | uniq }}
      {{- range $exempt }}
      - {{ . | quote }}
      {{- end }}
  {{- with .Values.webhook.extraNamespaceSelectorExpressions }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Checks of value combinations the schema cannot express. */}}
{{- define "mandate.validate" -}}
{{- $v := .Values }}
{{- if and $v.image.envoy.pullPolicy (ne $v.image.envoy.pullPolicy $v.image.sidecar.pullPolicy) }}
{{- fail (printf "image.envoy.pullPolicy (%s) differs from image.sidecar.pullPolicy (%s): the operator injects both containers with one pull policy; set them equal (or leave image.envoy.pullPolicy empty)" $v.image.envoy.pullPolicy $v.image.sidecar.pullPolicy) }}
{{- end }}
{{- if and (eq $v.webhook.certificate.source "secret") (not $v.webhook.certificate.secretName) }}
{{- fail "webhook.certificate.source=secret needs webhook.certificate.secretName (a Secret in the release namespace with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and (gt (int $v.operator.shutdownDrainSeconds) 0) (ge (int $v.operator.shutdownDrainSeconds) (int $v.operator.terminationGracePeriodSeconds)) }}
{{- fail (printf "operator.shutdownDrainSeconds (%v) must be below operator.terminationGracePeriodSeconds (%v): the kubelet kills a replica still draining at the end of its grace period" $v.operator.shutdownDrainSeconds $v.operator.terminationGracePeriodSeconds) }}
{{- end }}
{{- if and (not $v.webhook.certificate.patchCABundle) (ne $v.webhook.certificate.source "certManager") }}
{{- fail "webhook.certificate.patchCABundle=false leaves caBundle to cert-manager's CA injector, so it needs webhook.certificate.source=certManager" }}
{{- end }}
{{- end }}
