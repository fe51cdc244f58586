{{/* Names, labels and the per-host settings shared by the templates. */}}

{{- define "labmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "labmesh.fullname" -}}
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

{{- define "labmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "labmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "labmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "labmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "labmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* tcp://SERVICE.NAMESPACE.svc:PORT, what hosts and in-cluster clients use. */}}
{{- define "labmesh.discoveryEndpoint" -}}
{{- printf "tcp://%s.%s.svc:%v" .Values.discovery.serviceName .Release.Namespace .Values.discovery.ports.api }}
{{- end }}

{{/*
One host's settings as JSON: each key of hostDefaults (and of hostDefaults.usb) taken from the
host entry when it has that key, else the default. Done key by key because Helm's merge
functions ignore false and empty values (a host's `hostNetwork: false` must win).
Call: include "labmesh.hostSettings" (dict "root" $ "host" $host) | fromJson
*/}}
{{- define "labmesh.hostSettings" -}}
{{- $defaults := .root.Values.hostDefaults }}
{{- $host := .host }}
{{- $out := dict }}
{{- range $key, $value := $defaults }}
{{- $_ := set $out $key (ternary (index $host $key) $value (hasKey $host $key)) }}
{{- end }}
{{- $hostUsb := $host.usb | default dict }}
{{- $usb := dict }}
{{- range $key, $value := $defaults.usb }}
{{- $_ := set $usb $key (ternary (index $hostUsb $key) $value (hasKey $hostUsb $key)) }}
{{- end }}
{{- $_ := set $out "usb" $usb }}
{{- range $key, $value := $host }}
{{- if not (hasKey $out $key) }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
A host's labmesh host file, with `host` (default: the entry's name) and `discovery` (default:
this release's discovery Service) filled in when it lacks them. From `configFile` (the file's
text, kept verbatim: only labmesh parses it) or `config` (a mapping, rendered with toYaml).
Call: include "labmesh.hostConfig" (dict "root" $ "host" $settings)
*/}}
{{- define "labmesh.hostConfig" -}}
{{- $endpoint := include "labmesh.discoveryEndpoint" .root }}
{{- $withDiscovery := .root.Values.discovery.enabled }}
{{- if .host.configFile }}
{{- $text := .host.configFile | trimSuffix "\n" }}
{{- $parsed := $text | fromYaml }}
{{- if or (hasKey $parsed "Error") (not (kindIs "slice" $parsed.devices)) }}
{{- fail (printf "hosts[%s].configFile: not a labmesh host file with a devices list (%s)" .host.name ($parsed.Error | default "no devices")) }}
{{- end }}
{{- if not (hasKey $parsed "host") }}
{{- $text = printf "%s\nhost: %s" $text .host.name }}
{{- end }}
{{- if and $withDiscovery (not (hasKey $parsed "discovery")) }}
{{- $text = printf "%s\ndiscovery: %s" $text $endpoint }}
{{- end }}
{{- $text }}
{{- else }}
{{- $config := deepCopy .host.config }}
{{- if not (hasKey $config "host") }}
{{- $_ := set $config "host" .host.name }}
{{- end }}
{{- if and $withDiscovery (not (hasKey $config "discovery")) }}
{{- $_ := set $config "discovery" $endpoint }}
{{- end }}
{{- toYaml $config | trimSuffix "\n" }}
{{- end }}
{{- end }}

{{/* The host file's metrics_port (labmesh's default 9105; empty when the file sets null). */}}
{{- define "labmesh.metricsPort" -}}
{{- if hasKey .config "metrics_port" }}
{{- with .config.metrics_port }}{{ . }}{{ end }}
{{- else -}}
9105
{{- end }}
{{- end }}

{{- define "labmesh.hostResourceName" -}}
{{- printf "%s-host-%s" (include "labmesh.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}
