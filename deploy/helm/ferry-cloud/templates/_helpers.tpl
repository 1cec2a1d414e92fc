{{/* Names: <release>-ferry-cloud (unless the release already says so) and <that>-vllm. */}}
{{- define "ferry-cloud.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry-cloud.vllmName" -}}
{{- printf "%s-vllm" (include "ferry-cloud.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry-cloud.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; include with (dict "ctx" $ "component" "cloud"|"vllm"). */}}
{{- define "ferry-cloud.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ferry-cloud.labels" -}}
{{ include "ferry-cloud.selectorLabels" . }}
helm.sh/chart: {{ include "ferry-cloud.chart" .ctx }}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- if eq .component "cloud" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "ferry-cloud.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ferry-cloud.servedModelName" -}}
{{- default .Values.vllm.model .Values.vllm.servedModelName -}}
{{- end -}}

{{- define "ferry-cloud.vllmBaseUrl" -}}
{{- printf "http://%s:%d/v1" (include "ferry-cloud.vllmName" .) (int .Values.vllm.port) -}}
{{- end -}}

{{/* Where the pod finds its files. */}}
{{- define "ferry-cloud.configDir" -}}/etc/ferry/config{{- end -}}
{{- define "ferry-cloud.tlsDir" -}}/etc/ferry/tls{{- end -}}
{{- define "ferry-cloud.clientCADir" -}}/etc/ferry/client-ca{{- end -}}
{{- define "ferry-cloud.authDir" -}}/etc/ferry/auth{{- end -}}

{{/*
The listener must be authenticated: ferry-cloud itself refuses to start otherwise, so the chart
refuses to render a Deployment that could never become ready.
*/}}
{{- define "ferry-cloud.checkSecurity" -}}
{{- $mutual := and .Values.tls.enabled .Values.tls.mutual -}}
{{- if not (or $mutual .Values.auth.tokensSecretName .Values.auth.allowUnauthenticatedNetwork) -}}
{{- fail "ferry-cloud listens on the pod network and needs authentication: set tls.enabled and tls.mutual (mutual TLS), or auth.tokensSecretName (bearer tokens), or auth.allowUnauthenticatedNetwork=true" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a Secret with tls.crt, tls.key and ca.crt" -}}
{{- end -}}
{{- end -}}

{{/* One TOML key = value line; JSON scalars and arrays of scalars are valid TOML values. */}}
{{- define "ferry-cloud.tomlKV" -}}
{{ .key }} = {{ toJson .value }}
{{- end -}}

{{/* cloud.toml, from the values. */}}
{{- define "ferry-cloud.cloudToml" -}}
{{- $v := .Values -}}
# Written by the ferry-cloud Helm chart ({{ include "ferry-cloud.chart" . }}, release {{ .Release.Name }}).
# Edit the chart's values, not this ConfigMap.

version = 1

[server]
listen = {{ printf "0.0.0.0:%d" (int $v.service.grpcPort) | quote }}
http_addr = {{ printf "0.0.0.0:%d" (int $v.service.httpPort) | quote }}
{{- range $k, $val := ($v.config.server | default dict) }}
{{ include "ferry-cloud.tomlKV" (dict "key" $k "value" $val) }}
{{- end }}

[tls]
{{- if $v.tls.enabled }}
cert_file = "{{ include "ferry-cloud.tlsDir" . }}/tls.crt"
key_file = "{{ include "ferry-cloud.tlsDir" . }}/tls.key"
{{- if $v.tls.mutual }}
{{- if $v.tls.clientCASecretName }}
client_ca_file = "{{ include "ferry-cloud.clientCADir" . }}/ca.crt"
{{- else }}
client_ca_file = "{{ include "ferry-cloud.tlsDir" . }}/ca.crt"
{{- end }}
{{- end }}
{{- end }}

[auth]
{{- if $v.auth.tokensSecretName }}
tokens_file = "{{ include "ferry-cloud.authDir" . }}/tokens"
{{- end }}
allow_unauthenticated_network = {{ $v.auth.allowUnauthenticatedNetwork | toJson }}
{{- range $table, $kvs := $v.config }}
{{- if ne $table "server" }}

[{{ $table }}]
{{- range $k, $val := $kvs }}
{{ include "ferry-cloud.tomlKV" (dict "key" $k "value" $val) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $i, $m := $v.models }}
{{- $m := deepCopy $m }}
{{- $_ := set $m "backend" (default "openai" $m.backend) }}
{{- if not $m.base_url }}
{{- if not $v.vllm.enabled }}
{{- fail (printf "models[%d] (%s) needs a base_url: vllm.enabled is false" $i $m.id) }}
{{- end }}
{{- $_ := set $m "base_url" (include "ferry-cloud.vllmBaseUrl" $) }}
{{- if not $m.upstream_model }}
{{- $_ := set $m "upstream_model" (include "ferry-cloud.servedModelName" $) }}
{{- end }}
{{- if and $v.vllm.apiKey.secretName (not $m.api_key_env) }}
{{- $_ := set $m "api_key_env" "VLLM_API_KEY" }}
{{- end }}
{{- end }}

[[models]]
id = {{ toJson $m.id }}
{{- range $k, $val := omit $m "id" }}
{{ include "ferry-cloud.tomlKV" (dict "key" $k "value" $val) }}
{{- end }}
{{- end }}
{{ end -}}
