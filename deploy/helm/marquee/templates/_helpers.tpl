{{/*
Shared helpers. Every per-component template calls these with a context built by
"marquee.ctx": (dict "root" $ "name" "<component>" "c" <component values>).
*/}}

{{/* The components this chart knows, in start order (backends before the gateway). */}}
{{- define "marquee.components" -}}
vision language recommendation gateway
{{- end -}}

{{- define "marquee.backends" -}}
vision language recommendation
{{- end -}}

{{- define "marquee.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "marquee.fullname" -}}
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

{{/* Object name of a component: <fullname>-<component>. Arg: ctx. */}}
{{- define "marquee.componentName" -}}
{{- printf "%s-%s" (include "marquee.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object of the release carries. Arg: root. */}}
{{- define "marquee.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "marquee.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: marquee
{{- end -}}

{{/* Selector labels of a component's pods. Arg: ctx. */}}
{{- define "marquee.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marquee.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* All labels of a component's objects. Arg: ctx. */}}
{{- define "marquee.labels" -}}
{{ include "marquee.commonLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* The container image of a component. Arg: ctx. */}}
{{- define "marquee.image" -}}
{{- $tag := .c.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .c.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .c.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Milliseconds of `server.<key>` as the service will use it: the configured value or the
service's built-in default (docs/CONFIG.md). Arg: (list ctx key default). */}}
{{- define "marquee.serverMs" -}}
{{- $ctx := index . 0 -}}
{{- $key := index . 1 -}}
{{- $server := (($ctx.c.config | default dict).server | default dict) -}}
{{- if hasKey $server $key -}}{{ index $server $key | int64 }}{{- else -}}{{ index . 2 }}{{- end -}}
{{- end -}}

{{/* Seconds from SIGTERM to exit at most: drain_delay_ms (still serving, NOT_SERVING) plus
shutdown_grace_ms (in-flight calls finish), rounded up. Arg: ctx. */}}
{{- define "marquee.drainSeconds" -}}
{{- $drain := include "marquee.serverMs" (list . "drain_delay_ms" 0) | int64 -}}
{{- $grace := include "marquee.serverMs" (list . "shutdown_grace_ms" 30000) | int64 -}}
{{- div (add $drain $grace 999) 1000 -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: preStop sleep + drain + margin, so the kubelet never kills
a pod that is still finishing calls. Arg: ctx. */}}
{{- define "marquee.terminationGraceSeconds" -}}
{{- add (.c.preStopSleepSeconds | default 0 | int64) (include "marquee.drainSeconds" . | int64) (.c.terminationGraceMarginSeconds | default 0 | int64) -}}
{{- end -}}

{{/* gRPC address the gateway dials for a backend: its headless Service, which resolves to every
ready pod. Arg: (list root name). */}}
{{- define "marquee.backendDns" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $c := index $root.Values $name -}}
{{- printf "%s-%s.%s.svc.cluster.local:%d" (include "marquee.fullname" $root) $name $root.Release.Namespace ($c.ports.grpc | int) -}}
{{- end -}}

{{/* Paths of mounted secrets (gateway). */}}
{{- define "marquee.apiKeysDir" -}}/etc/marquee/secrets/api-keys{{- end -}}
{{- define "marquee.jwtDir" -}}/etc/marquee/secrets/jwt{{- end -}}
{{- define "marquee.configDir" -}}/etc/marquee/config{{- end -}}
{{- define "marquee.userIdKeyDir" -}}/etc/marquee/secrets/user-id-key{{- end -}}
{{- define "marquee.tenantTokenDir" -}}/etc/marquee/secrets/tenant-token{{- end -}}
{{- define "marquee.postgresDir" -}}/etc/marquee/secrets/postgres{{- end -}}
{{- define "marquee.postgresCaDir" -}}/etc/marquee/secrets/postgres-ca{{- end -}}

{{/* The Secret holding the recommender's user-id hash key: the named one, else the one the
chart generates (templates/secrets.yaml). Arg: root. */}}
{{- define "marquee.userIdKeySecret" -}}
{{- .Values.secrets.userIdKey.existingSecret | default (printf "%s-recommendation-user-id-key" (include "marquee.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/* The Secret holding the tenant token the gateway and the recommender share. Arg: root. */}}
{{- define "marquee.tenantTokenSecret" -}}
{{- .Values.secrets.tenantToken.existingSecret | default (printf "%s-tenant-token" (include "marquee.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/* The one file both sides read the tenant token from: the same path in the gateway's
`backends.recommendation.tenant_token_file` and the recommender's
`recommendation.tenant_token_file`. Arg: root. */}}
{{- define "marquee.tenantTokenFile" -}}
{{- printf "%s/%s" (include "marquee.tenantTokenDir" .) .Values.secrets.tenantToken.key -}}
{{- end -}}

{{/* The recommender's store ("file" or "postgres"). Arg: root. */}}
{{- define "marquee.recommendationStore" -}}
{{- .Values.recommendation.store | default "file" -}}
{{- end -}}

{{/* The service's whole config as a dict: the component's `config` values plus the keys the
chart owns. Rendered to TOML by "marquee.toml". Arg: ctx. */}}
{{- define "marquee.configDict" -}}
{{- $root := .root -}}
{{- $cfg := deepCopy (.c.config | default dict) -}}
{{- $server := $cfg.server | default dict -}}
{{- $_ := set $server "grpc_addr" (printf "0.0.0.0:%d" (.c.ports.grpc | int)) -}}
{{- $_ := set $server "admin_addr" (printf "0.0.0.0:%d" (.c.ports.admin | int)) -}}
{{- $_ := set $cfg "server" $server -}}
{{- $_ := set $cfg "telemetry" (dict "log_format" $root.Values.telemetry.logFormat "log_filter" $root.Values.telemetry.logFilter) -}}
{{- if eq .name "gateway" -}}
  {{- $tuning := $cfg.backends | default dict -}}
  {{- $backends := dict -}}
  {{- range $b := splitList " " (include "marquee.backends" $root) -}}
    {{- $bc := index $root.Values $b -}}
    {{- if $bc.enabled -}}
      {{- $entry := deepCopy (index $tuning $b | default dict) -}}
      {{- $_ := set $entry "kind" $b -}}
      {{- $_ := set $entry "dns" (include "marquee.backendDns" (list $root $b)) -}}
      {{- /* Replaces the gateway's built-in default (127.0.0.1:8001): only DNS finds replicas. */ -}}
      {{- $_ := set $entry "endpoints" list -}}
      {{- if eq $b "recommendation" -}}
        {{- /* Sent beside the caller's tenant: the recommender accepts a tenant only with it. */ -}}
        {{- $_ := set $entry "tenant_token_file" (include "marquee.tenantTokenFile" $root) -}}
      {{- end -}}
      {{- $_ := set $backends $b $entry -}}
    {{- end -}}
  {{- end -}}
  {{- $_ := set $cfg "backends" $backends -}}
  {{- $auth := $cfg.auth | default dict -}}
  {{- if $root.Values.secrets.apiKeys.existingSecret -}}
    {{- $_ := set $auth "api_keys_file" (printf "%s/%s" (include "marquee.apiKeysDir" .) $root.Values.secrets.apiKeys.key) -}}
  {{- end -}}
  {{- $jwtValues := $root.Values.secrets.jwt -}}
  {{- if $jwtValues.existingSecret -}}
    {{- $jwt := $auth.jwt | default dict -}}
    {{- $dir := include "marquee.jwtDir" . -}}
    {{- if $jwtValues.hs256Key -}}{{- $_ := set $jwt "hs256_secret_file" (printf "%s/%s" $dir $jwtValues.hs256Key) -}}{{- end -}}
    {{- if $jwtValues.jwksKey -}}{{- $_ := set $jwt "jwks_file" (printf "%s/%s" $dir $jwtValues.jwksKey) -}}{{- end -}}
    {{- $pems := list -}}
    {{- range $k := $jwtValues.publicKeys -}}{{- $pems = append $pems (printf "%s/%s" $dir $k) -}}{{- end -}}
    {{- if $pems -}}{{- $_ := set $jwt "public_key_files" $pems -}}{{- end -}}
    {{- $_ := set $auth "jwt" $jwt -}}
  {{- end -}}
  {{- $_ := set $cfg "auth" $auth -}}
{{- else -}}
  {{- /* Every model service reads its models from `[repository]`: the chart owns `path` (the
  model mount) and, on GPU nodes, `device`; the rest of `repository` comes from values. */ -}}
  {{- $repo := $cfg.repository | default dict -}}
  {{- $_ := set $repo "path" .c.modelStorage.mountPath -}}
  {{- if .c.gpu.enabled -}}{{- $_ := set $repo "device" .c.gpu.device -}}{{- end -}}
  {{- $_ := set $cfg "repository" $repo -}}
  {{- if eq .name "recommendation" -}}
    {{- $rec := $cfg.recommendation | default dict -}}
    {{- /* With the postgres store state_dir is a scratch emptyDir (deployment.yaml): nothing the
    service defaults to lands on the read-only root filesystem. */ -}}
    {{- $_ := set $rec "state_dir" .c.state.mountPath -}}
    {{- if eq (include "marquee.recommendationStore" $root) "postgres" -}}
      {{- /* `file` is the service's default and is left unsaid. */ -}}
      {{- $_ := set $rec "store" "postgres" -}}
      {{- $pg := $rec.postgres | default dict -}}
      {{- $_ := set $pg "url_file" (printf "%s/%s" (include "marquee.postgresDir" .) .c.postgres.key) -}}
      {{- with .c.postgres.ca }}{{ if .key -}}
      {{- $_ := set $pg "ca_file" (printf "%s/%s" (include "marquee.postgresCaDir" $) .key) -}}
      {{- end }}{{ end -}}
      {{- $_ := set $rec "postgres" $pg -}}
    {{- end -}}
    {{- /* Always from a Secret: every replica (and every restart) must hash user ids with the
    same key, which a key the service creates in its own volume cannot promise. */ -}}
    {{- $_ := set $rec "user_id_key_file" (printf "%s/%s" (include "marquee.userIdKeyDir" .) $root.Values.secrets.userIdKey.key) -}}
    {{- $_ := set $rec "tenant_token_file" (include "marquee.tenantTokenFile" $root) -}}
    {{- $_ := set $cfg "recommendation" $rec -}}
  {{- end -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/*
TOML rendering. Helm's own toToml writes every number as a float (YAML numbers arrive as
float64), which the services' integer settings refuse; this writes integral numbers as integers.
*/}}
{{- define "marquee.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "marquee.toml.value" -}}
{{- $k := kindOf . -}}
{{- if eq $k "float64" -}}
  {{- if eq (float64 (int64 .)) . -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if or (eq $k "int") (eq $k "int64") (eq $k "bool") -}}{{ . }}
{{- else if eq $k "string" -}}{{ toJson . }}
{{- else if eq $k "slice" -}}[{{- range $i, $e := . -}}{{- if $i }}, {{ end -}}{{ include "marquee.toml.value" $e }}{{- end -}}]
{{- else if eq $k "map" -}}{ {{- range $i, $key := keys . | sortAlpha -}}{{- if $i }},{{ end }} {{ include "marquee.toml.key" $key }} = {{ include "marquee.toml.value" (index $ $key) }}{{- end }} }
{{- else -}}{{ fail (printf "cannot write a %s as TOML" $k) }}
{{- end -}}
{{- end -}}

{{/* A list of tables is written as [[array]] sections. */}}
{{- define "marquee.toml.isTableArray" -}}
{{- if and (eq (kindOf .) "slice") (gt (len .) 0) (eq (kindOf (first .)) "map") -}}true{{- end -}}
{{- end -}}

{{/* Arg: (dict "prefix" "a.b" "table" map). Scalars first, then sub-tables. Nulls are left out. */}}
{{- define "marquee.toml.table" -}}
{{- $prefix := .prefix -}}
{{- $t := .table -}}
{{- range $key := keys $t | sortAlpha -}}
{{- $v := index $t $key -}}
{{- if and (not (kindIs "invalid" $v)) (ne (kindOf $v) "map") (not (include "marquee.toml.isTableArray" $v)) }}
{{ include "marquee.toml.key" $key }} = {{ include "marquee.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $key := keys $t | sortAlpha -}}
{{- $v := index $t $key -}}
{{- $path := ternary (include "marquee.toml.key" $key) (printf "%s.%s" $prefix (include "marquee.toml.key" $key)) (eq $prefix "") -}}
{{- if eq (kindOf $v) "map" }}

[{{ $path }}]
{{- include "marquee.toml.table" (dict "prefix" $path "table" $v) -}}
{{- else if include "marquee.toml.isTableArray" $v -}}
{{- range $e := $v }}

[[{{ $path }}]]
{{- include "marquee.toml.table" (dict "prefix" $path "table" $e) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "marquee.toml" -}}
{{- include "marquee.toml.table" (dict "prefix" "" "table" .) -}}
{{- end -}}

{{/* Pod-level security context (non-root; ids configurable). Arg: root. */}}
{{- define "marquee.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context, the same for every container. Arg: root. */}}
{{- define "marquee.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* NetworkPolicy peer for Prometheus. Arg: root. */}}
{{- define "marquee.prometheusPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml .Values.networkPolicy.prometheus.podSelector | nindent 4 }}
{{- end -}}
