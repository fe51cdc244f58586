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

{{/* repository@digest when image.digest is set (the tag is then ignored), else repository:tag. */}}
{{- define "labmesh.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
FULLNAME-SUFFIX within `max` characters: the full name is cut, never the suffix, so the
objects of one release keep distinct names however long the release's name is.
Call: include "labmesh.prefixed" (dict "root" $ "suffix" "discovery" "max" 63)
*/}}
{{- define "labmesh.prefixed" -}}
{{- $room := int (sub .max (add1 (len .suffix))) }}
{{- printf "%s-%s" (include "labmesh.fullname" .root | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{/* The discovery StatefulSet (52 characters at most: its pods' controller-revision-hash
label adds 11 to the name and must stay within 63). */}}
{{- define "labmesh.discoveryName" -}}
{{- include "labmesh.prefixed" (dict "root" . "suffix" "discovery" "max" 52) }}
{{- end }}

{{/* The headless Service that gives each discovery pod its own DNS name. */}}
{{- define "labmesh.discoveryHeadless" -}}
{{- include "labmesh.prefixed" (dict "root" . "suffix" "discovery-headless" "max" 63) }}
{{- end }}

{{/* The lookup Service (discovery.serviceName, default: the StatefulSet's name). */}}
{{- define "labmesh.discoveryService" -}}
{{- .Values.discovery.serviceName | default (include "labmesh.discoveryName" .) }}
{{- end }}

{{/* tcp://SERVICE.NAMESPACE.svc:PORT: the lookup Service, for in-cluster clients. */}}
{{- define "labmesh.discoveryEndpoint" -}}
{{- printf "tcp://%s.%s.svc:%v" (include "labmesh.discoveryService" .) .Release.Namespace .Values.discovery.ports.api }}
{{- end }}

{{/* Every discovery pod's own endpoint, comma-separated (what hosts register with: each). */}}
{{- define "labmesh.discoveryEndpoints" -}}
{{- $name := include "labmesh.discoveryName" . }}
{{- $headless := include "labmesh.discoveryHeadless" . }}
{{- $out := list }}
{{- range $i := until (int .Values.discovery.replicas) }}
{{- $out = append $out (printf "tcp://%s-%d.%s.%s.svc:%v" $name $i $headless $.Release.Namespace $.Values.discovery.ports.api) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{- define "labmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "labmesh.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The pod-level part of every pod spec: ServiceAccount, pull secrets. */}}
{{- define "labmesh.podCommon" -}}
serviceAccountName: {{ include "labmesh.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's securityContext under Pod Security "restricted" (with the pod's
runAsNonRoot and seccompProfile). */}}
{{- define "labmesh.restrictedContainer" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* Where the Secrets are mounted (read-only files; labmesh is given these paths). */}}
{{- define "labmesh.keysPath" -}}
/var/run/secrets/labmesh/keys
{{- end }}
{{- define "labmesh.clientsPath" -}}
/var/run/secrets/labmesh/clients
{{- end }}

{{/* Whether CurveZMQ keys come from Secrets ("true" or empty); fails on half a setup. */}}
{{- define "labmesh.secured" -}}
{{- if .Values.security.existingSecret }}
{{- if not .Values.security.clientsSecret }}
{{- fail "security.clientsSecret is required with security.existingSecret: the Secret of the public NAME.key files discovery and the device servers accept" }}
{{- end -}}
true
{{- else if .Values.security.clientsSecret }}
{{- fail "security.clientsSecret needs security.existingSecret (the Secret of the key pairs)" }}
{{- end }}
{{- end }}

{{/*
The Secret volumes of a pod: `keys` (only the listed entries of security.existingSecret) and
`clients` (all of security.clientsSecret). Call with (dict "root" $ "items" (list ...)).
*/}}
{{- define "labmesh.keyVolumes" -}}
- name: keys
  secret:
    secretName: {{ .root.Values.security.existingSecret }}
    defaultMode: 0440
    items:
      {{- range $item := .items | uniq }}
      - key: {{ $item }}
        path: {{ $item }}
      {{- end }}
- name: clients
  secret:
    secretName: {{ .root.Values.security.clientsSecret }}
    defaultMode: 0440
{{- end }}
{{- define "labmesh.keyMounts" -}}
- name: keys
  mountPath: {{ include "labmesh.keysPath" . }}
  readOnly: true
- name: clients
  mountPath: {{ include "labmesh.clientsPath" . }}
  readOnly: true
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
{{- $endpoints := include "labmesh.discoveryEndpoints" .root | splitList "," }}
{{- $withDiscovery := .root.Values.discovery.enabled }}
{{- $security := dict }}
{{- if include "labmesh.secured" .root }}
{{- $keys := include "labmesh.keysPath" .root }}
{{- $_ := set $security "key" (printf "%s/%s.key_secret" $keys (.host.keyName | default .host.name)) }}
{{- $_ := set $security "clients" (include "labmesh.clientsPath" .root) }}
{{- $_ := set $security "discovery_key" (printf "%s/%s.key" $keys .root.Values.security.discoveryKey) }}
{{- end }}
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
{{- $text = printf "%s\ndiscovery: [%s]" $text (join ", " $endpoints) }}
{{- end }}
{{- /* a file's own security: section is kept as it is (it names the mounted paths itself) */}}
{{- if and $security (not (hasKey $parsed "security")) }}
{{- $text = printf "%s\nsecurity:\n%s" $text (toYaml $security | trimSuffix "\n" | indent 2) }}
{{- end }}
{{- $text }}
{{- else }}
{{- $config := deepCopy .host.config }}
{{- if not (hasKey $config "host") }}
{{- $_ := set $config "host" .host.name }}
{{- end }}
{{- if and $withDiscovery (not (hasKey $config "discovery")) }}
{{- $_ := set $config "discovery" $endpoints }}
{{- end }}
{{- if $security }}
{{- /* the mapping's own security keys (roles, keys, ...) stay; missing paths are filled in */}}
{{- $own := get $config "security" | default dict }}
{{- $_ := set $config "security" (merge (deepCopy $own) $security) }}
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
{{- include "labmesh.prefixed" (dict "root" .root "suffix" (printf "host-%s" .name) "max" 63) }}
{{- end }}
