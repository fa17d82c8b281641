{{/* vim: set filetype=mustache: */}}

{{- define "analytics-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's resources. Truncated to 52 characters so that suffixes such as
"-headless" and "-migrate-0123456789" still fit the 63-character DNS label limit.
*/}}
{{- define "analytics-service.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "analytics-service.headlessName" -}}
{{- printf "%s-headless" (include "analytics-service.fullname" .) -}}
{{- end -}}

{{- define "analytics-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels on every resource, as one map: commonLabels may override the informational labels
(part-of, version, helm.sh/chart) but never the selector labels or managed-by (validate
refuses those), so no key is ever written twice.
*/}}
{{- define "analytics-service.labelMap" -}}
{{- $labels := dict
  "helm.sh/chart" (include "analytics-service.chart" .)
  "app.kubernetes.io/version" (include "analytics-service.imageTag" .)
  "app.kubernetes.io/part-of" "analytics-service" -}}
{{- $labels = mergeOverwrite $labels (deepCopy (.Values.commonLabels | default dict)) -}}
{{- $labels = mergeOverwrite $labels (include "analytics-service.selectorLabels" . | fromYaml) (dict "app.kubernetes.io/managed-by" .Release.Service) -}}
{{- toYaml $labels -}}
{{- end -}}

{{- define "analytics-service.labels" -}}
{{ include "analytics-service.labelMap" . }}
{{- end -}}

{{/*
Labels of one component's object: the common labels, the component, then `extra` (podLabels,
service.labels) overriding informational keys. Call with (dict "root" $ "component" NAME
"extra" MAP).
*/}}
{{- define "analytics-service.componentLabels" -}}
{{- $labels := include "analytics-service.labelMap" .root | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/component" .component -}}
{{- $labels = mergeOverwrite $labels (deepCopy (.extra | default dict)) -}}
{{- toYaml $labels -}}
{{- end -}}

{{- define "analytics-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "analytics-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector of the server pods (the migration Job and test pods carry other components). */}}
{{- define "analytics-service.serverSelectorLabels" -}}
{{ include "analytics-service.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "analytics-service.migrationSelectorLabels" -}}
{{ include "analytics-service.selectorLabels" . }}
app.kubernetes.io/component: migrations
{{- end -}}

{{- define "analytics-service.testSelectorLabels" -}}
{{ include "analytics-service.selectorLabels" . }}
app.kubernetes.io/component: test
{{- end -}}

{{- define "analytics-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "analytics-service.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "analytics-service.migrationServiceAccountName" -}}
{{- if .Values.migrations.serviceAccount.create -}}
{{- default (printf "%s-migrate" (include "analytics-service.fullname" .)) .Values.migrations.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.migrations.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image ------------------------------------------------------------------------------ */}}
{{- define "analytics-service.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "analytics-service.image" -}}
{{- $reference := printf "%s:%s" .Values.image.repository (include "analytics-service.imageTag" .) -}}
{{- if .Values.image.digest -}}
{{- $reference = printf "%s@%s" $reference .Values.image.digest -}}
{{- end -}}
{{- $reference -}}
{{- end -}}

{{- define "analytics-service.imagePullPolicy" -}}
{{- if .Values.image.pullPolicy -}}
{{- .Values.image.pullPolicy -}}
{{- else if .Values.image.digest -}}
IfNotPresent
{{- else -}}
Always
{{- end -}}
{{- end -}}

{{/* Settings ---------------------------------------------------------------------------- */}}
{{/*
The runtime PostgreSQL connection: postgres.*, or a CloudNativePG Cluster's read-write
Service (or Pooler), database and CLUSTER-app Secret when cloudnativePG.enabled.
*/}}
{{- define "analytics-service.postgresHost" -}}
{{- $cnpg := .Values.cloudnativePG -}}
{{- if not $cnpg.enabled -}}
{{- .Values.postgres.host -}}
{{- else if $cnpg.pooler.enabled -}}
{{- default (printf "%s-pooler-rw" $cnpg.clusterName) $cnpg.pooler.name -}}
{{- else -}}
{{- printf "%s-rw" $cnpg.clusterName -}}
{{- end -}}
{{- end -}}

{{/*
POSTGRES_POOLER: transaction when postgres.pooler says so or the CloudNativePG Pooler runs
in transaction mode; otherwise none.
*/}}
{{- define "analytics-service.postgresPooler" -}}
{{- $cnpg := .Values.cloudnativePG -}}
{{- if or (eq .Values.postgres.pooler "transaction") (and $cnpg.enabled $cnpg.pooler.enabled (eq $cnpg.pooler.mode "transaction")) -}}
transaction
{{- else -}}
none
{{- end -}}
{{- end -}}

{{/*
MIGRATION_POSTGRES_HOST: postgres.migration.host, else CLUSTER-rw behind a CloudNativePG
Pooler in transaction mode; empty = the server's host. Behind a transaction pooler the
migration Job needs PostgreSQL itself (migrate holds a session-level advisory lock), so a
transaction pooler without a migration address fails the render.
*/}}
{{- define "analytics-service.migrationPostgresHost" -}}
{{- $cnpg := .Values.cloudnativePG -}}
{{- $host := .Values.postgres.migration.host -}}
{{- if and (not $host) $cnpg.enabled $cnpg.pooler.enabled (eq $cnpg.pooler.mode "transaction") -}}
{{- $host = printf "%s-rw" $cnpg.clusterName -}}
{{- end -}}
{{- if and (eq (include "analytics-service.postgresPooler" .) "transaction") (not $host) (not .Values.postgres.migration.port) -}}
{{- fail "postgres.pooler transaction: set postgres.migration.host (and port) to PostgreSQL itself; the migration Job holds a session-level advisory lock" -}}
{{- end -}}
{{- $host -}}
{{- end -}}

{{- define "analytics-service.postgresDatabase" -}}
{{- ternary .Values.cloudnativePG.database .Values.postgres.database .Values.cloudnativePG.enabled -}}
{{- end -}}

{{/* Effective postgres.auth (username, password, existingSecret, usernameKey, passwordKey). */}}
{{- define "analytics-service.postgresAuth" -}}
{{- $cnpg := .Values.cloudnativePG -}}
{{- if $cnpg.enabled -}}
{{- toYaml (dict "username" "" "password" "" "existingSecret" (default (printf "%s-app" $cnpg.clusterName) $cnpg.secretName) "usernameKey" "username" "passwordKey" "password") -}}
{{- else -}}
{{- toYaml .Values.postgres.auth -}}
{{- end -}}
{{- end -}}

{{- define "analytics-service.postgresSecretName" -}}
{{- $auth := include "analytics-service.postgresAuth" . | fromYaml -}}
{{- default (printf "%s-credentials" (include "analytics-service.fullname" .)) $auth.existingSecret -}}
{{- end -}}

{{- define "analytics-service.redisSecretName" -}}
{{- default (printf "%s-credentials" (include "analytics-service.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* Is Redis on? Standalone: redis.host set; sentinel and cluster: redis.nodes listed. */}}
{{- define "analytics-service.redisEnabled" -}}
{{- if eq .Values.redis.mode "standalone" -}}
{{- if .Values.redis.host }}true{{ end -}}
{{- else if .Values.redis.nodes -}}
true
{{- end -}}
{{- end -}}

{{/* The TCP ports the service opens to Redis: redis.port and those of redis.nodes. */}}
{{- define "analytics-service.redisPorts" -}}
{{- $ports := list (int .Values.redis.port) -}}
{{- if ne .Values.redis.mode "standalone" -}}
{{- range .Values.redis.nodes -}}
{{- $ports = append $ports (int (last (splitList ":" .))) -}}
{{- end -}}
{{- end -}}
{{- $ports | uniq | toJson -}}
{{- end -}}

{{/* Does the chart create the runtime credentials Secret? */}}
{{- define "analytics-service.createCredentialsSecret" -}}
{{- $auth := include "analytics-service.postgresAuth" . | fromYaml -}}
{{- if or (not $auth.existingSecret) (and (include "analytics-service.redisEnabled" .) (not .Values.redis.auth.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/*
Does the chart render the RELEASE-migrate-credentials Secret? Either for the migrations' own
password, or in hook mode as a hook copy of the runtime password: a pre-install hook Job
runs before the release's ordinary Secret exists.
*/}}
{{- define "analytics-service.migrationCreatesSecret" -}}
{{- $runtimeAuth := include "analytics-service.postgresAuth" . | fromYaml -}}
{{- if and (ne .Values.migrations.mode "external") (not .Values.migrations.auth.existingSecret) -}}
{{- if or .Values.migrations.auth.password .Values.migrations.auth.username -}}
true
{{- else if and (eq .Values.migrations.mode "hook") (not $runtimeAuth.existingSecret) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "analytics-service.migrationSecretName" -}}
{{- if .Values.migrations.auth.existingSecret -}}
{{- .Values.migrations.auth.existingSecret -}}
{{- else if include "analytics-service.migrationCreatesSecret" . -}}
{{- printf "%s-migrate-credentials" (include "analytics-service.fullname" .) -}}
{{- else -}}
{{- include "analytics-service.postgresSecretName" . -}}
{{- end -}}
{{- end -}}

{{/* Credentials (username, usernameKey, passwordKey) the migration Job reads. */}}
{{- define "analytics-service.migrationAuth" -}}
{{- $own := .Values.migrations.auth -}}
{{- $runtimeAuth := include "analytics-service.postgresAuth" . | fromYaml -}}
{{- $username := default $runtimeAuth.username $own.username -}}
{{- if $own.existingSecret -}}
{{- toYaml (dict "username" $username "usernameKey" $own.usernameKey "passwordKey" $own.passwordKey) -}}
{{- else if include "analytics-service.migrationCreatesSecret" . -}}
{{- toYaml (dict "username" $username "usernameKey" "" "passwordKey" "postgres-password") -}}
{{- else -}}
{{- toYaml (dict "username" $runtimeAuth.username "usernameKey" $runtimeAuth.usernameKey "passwordKey" $runtimeAuth.passwordKey) -}}
{{- end -}}
{{- end -}}

{{- define "analytics-service.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "analytics-service.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* DNS names of both Services in every form a caller may use. */}}
{{- define "analytics-service.serviceDnsNames" -}}
{{- $namespace := .Release.Namespace -}}
{{- $names := list (include "analytics-service.fullname" .) -}}
{{- if .Values.headlessService.enabled -}}
{{- $names = append $names (include "analytics-service.headlessName" .) -}}
{{- end -}}
{{- range $names }}
- {{ . }}
- {{ . }}.{{ $namespace }}
- {{ . }}.{{ $namespace }}.svc
- {{ . }}.{{ $namespace }}.svc.cluster.local
{{- end }}
{{- end -}}

{{/*
Database user and password from a Secret. Call with (dict "secretName" NAME "auth" AUTH),
AUTH holding username, usernameKey (empty: username is a plain value) and passwordKey.
*/}}
{{- define "analytics-service.postgresCredentialEnv" -}}
{{- if .auth.usernameKey }}
- name: POSTGRES_USER
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .auth.usernameKey }}
{{- else }}
- name: POSTGRES_USER
  value: {{ .auth.username | quote }}
{{- end }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .auth.passwordKey }}
{{- end -}}

{{/* Runtime credentials of the server and its schema-wait init container. */}}
{{- define "analytics-service.runtimeCredentialEnv" -}}
{{ include "analytics-service.postgresCredentialEnv" (dict "secretName" (include "analytics-service.postgresSecretName" .) "auth" (include "analytics-service.postgresAuth" . | fromYaml)) }}
{{- if include "analytics-service.redisEnabled" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "analytics-service.redisSecretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
{{- end }}
{{ include "analytics-service.otlpHeadersEnv" . }}
{{- end -}}

{{/*
OTEL_EXPORTER_OTLP_HEADERS from its Secret, for every container that reads the ConfigMap
(they all export traces to the collector it names). Empty when no Secret is set.
*/}}
{{- define "analytics-service.otlpHeadersEnv" -}}
{{- with .Values.config.otel.headers.existingSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.config.otel.headers.secretKey }}
{{- end }}
{{- end -}}

{{/*
CA bundles of the dependencies (PostgreSQL, Redis, the OTLP collector), each mounted
read-only from its Secret when one is set: the volume mounts, then the volumes. Both
render nothing when no CA Secret is set.
*/}}
{{- define "analytics-service.dependencyCaVolumeMounts" -}}
{{- with .Values.postgres.sslRootCert.existingSecret }}
- name: postgres-ca
  mountPath: {{ $.Values.postgres.sslRootCert.mountPath }}
  readOnly: true
{{- end }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.ca.existingSecret }}
- name: redis-ca
  mountPath: {{ .Values.redis.tls.ca.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.config.otel.certificate.existingSecret }}
- name: otlp-ca
  mountPath: {{ $.Values.config.otel.certificate.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "analytics-service.dependencyCaVolumes" -}}
{{- with .Values.postgres.sslRootCert }}
{{- if .existingSecret }}
- name: postgres-ca
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0444
    items:
      - key: {{ .secretKey }}
        path: {{ .secretKey }}
{{- end }}
{{- end }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.ca.existingSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.ca.existingSecret }}
    defaultMode: 0444
    items:
      - key: {{ .Values.redis.tls.ca.secretKey }}
        path: {{ .Values.redis.tls.ca.secretKey }}
{{- end }}
{{- with .Values.config.otel.certificate }}
{{- if .existingSecret }}
- name: otlp-ca
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0444
    items:
      - key: {{ .secretKey }}
        path: {{ .secretKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Migration hooks: before the release's other resources on install, before new pods on upgrade. */}}
{{- define "analytics-service.migrationHookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: {{ .deletePolicy }}
{{- end -}}

{{/* NetworkPolicy egress rules shared by the server, migration and test policies. */}}
{{- define "analytics-service.dnsEgressRule" -}}
- to:
    {{- toYaml .to | nindent 4 }}
  ports:
    {{- range .ports }}
    - protocol: UDP
      port: {{ . }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end -}}
{{- define "analytics-service.postgresEgressRule" -}}
{{- $peers := .Values.networkPolicy.egress.postgresTo -}}
{{- if and (not $peers) .Values.cloudnativePG.enabled -}}
{{- if .Values.cloudnativePG.pooler.enabled -}}
{{- $peers = list (dict "podSelector" (dict "matchLabels" (dict "cnpg.io/poolerName" (include "analytics-service.postgresHost" .)))) -}}
{{- else -}}
{{- $peers = list (dict "podSelector" (dict "matchLabels" (dict "cnpg.io/cluster" .Values.cloudnativePG.clusterName))) -}}
{{- end -}}
{{- end -}}
- ports:
    - protocol: TCP
      port: {{ .Values.postgres.port }}
  {{- with $peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Egress of the migration Job to PostgreSQL: its port is postgres.migration.port (when set),
and with CloudNativePG it reaches the Pooler's pods only when the Job goes through the
Pooler (session mode, no migration host); otherwise the Cluster's pods.
*/}}
{{- define "analytics-service.migrationPostgresEgressRule" -}}
{{- $peers := .Values.networkPolicy.egress.postgresTo -}}
{{- $cnpg := .Values.cloudnativePG -}}
{{- if and (not $peers) $cnpg.enabled -}}
{{- if and $cnpg.pooler.enabled (not (include "analytics-service.migrationPostgresHost" .)) -}}
{{- $peers = list (dict "podSelector" (dict "matchLabels" (dict "cnpg.io/poolerName" (include "analytics-service.postgresHost" .)))) -}}
{{- else -}}
{{- $peers = list (dict "podSelector" (dict "matchLabels" (dict "cnpg.io/cluster" $cnpg.clusterName))) -}}
{{- end -}}
{{- end -}}
- ports:
    - protocol: TCP
      port: {{ .Values.postgres.migration.port | default .Values.postgres.port }}
  {{- with $peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Egress to the read replica (postgres.readHost) on postgres.readPort (postgres.port when
empty), to the postgresTo peers or, with CloudNativePG, the Cluster's pods (its standbys,
never the Pooler's). Empty without a read replica. Only the server reads it.
*/}}
{{- define "analytics-service.postgresReadEgressRule" -}}
{{- if .Values.postgres.readHost -}}
{{- $peers := .Values.networkPolicy.egress.postgresTo -}}
{{- if and (not $peers) .Values.cloudnativePG.enabled -}}
{{- $peers = list (dict "podSelector" (dict "matchLabels" (dict "cnpg.io/cluster" .Values.cloudnativePG.clusterName))) -}}
{{- end -}}
- ports:
    - protocol: TCP
      port: {{ .Values.postgres.readPort | default .Values.postgres.port }}
  {{- with $peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/*
Egress to the OTLP collector, its port taken from config.otel.endpoint (scheme://host:port;
4317, the OTLP gRPC port, when the endpoint names none). Empty when tracing is off.
*/}}
{{- define "analytics-service.otlpEgressRule" -}}
{{- with .Values.config.otel.endpoint -}}
{{- $url := urlParse . -}}
{{- $hostPort := splitList ":" (get $url "host") -}}
{{- $port := 4317 -}}
{{- if gt (len $hostPort) 1 -}}
{{- $port = last $hostPort | int -}}
{{- end }}
- ports:
    - protocol: TCP
      port: {{ $port }}
  {{- with $.Values.networkPolicy.egress.otlpTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* Validation: fail the render on inconsistent settings. ------------------------------- */}}
{{- define "analytics-service.validate" -}}
{{- $reserved := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" "app.kubernetes.io/managed-by" -}}
{{- range $field, $labels := dict "commonLabels" .Values.commonLabels "podLabels" .Values.podLabels "service.labels" .Values.service.labels -}}
{{- range $key, $_ := $labels -}}
{{- if has $key $reserved -}}
{{- fail (printf "%s must not set %s: the chart sets it and Service, PDB and Deployment selectors (or Helm's ownership) depend on it" $field $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $needed := add .Values.preStopSleepSeconds .Values.shutdownDrainSeconds 5 -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds (%d) + shutdownDrainSeconds (%d) + 5 = %d, or SIGKILL cuts the drain short" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds) (int .Values.shutdownDrainSeconds) (int $needed)) -}}
{{- end -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (ne (toString $pdb.minAvailable) "") (not (kindIs "invalid" $pdb.maxUnavailable)) (ne (toString $pdb.maxUnavailable) "") -}}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both" -}}
{{- end -}}
{{- $pods := ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled | int -}}
{{- $podsSetting := ternary "autoscaling.minReplicas" "replicaCount" .Values.autoscaling.enabled -}}
{{- if and $pdb.enabled (gt $pods 1) (not (kindIs "invalid" $pdb.minAvailable)) (ne (toString $pdb.minAvailable) "") -}}
{{- $minAvailable := toString $pdb.minAvailable -}}
{{- $blocking := false -}}
{{- if hasSuffix "%" $minAvailable -}}
{{- $blocking = ge (trimSuffix "%" $minAvailable | int) 100 -}}
{{- else -}}
{{- $blocking = ge ($minAvailable | int) $pods -}}
{{- end -}}
{{- if $blocking -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%s) must leave at least one of the %d pods (%s) evictable, or every node drain blocks: lower it, raise %s, or use podDisruptionBudget.maxUnavailable" $minAvailable $pods $podsSetting $podsSetting) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage)) -}}
{{- if not (dig "requests" "cpu" "" (.Values.resources | default dict)) -}}
{{- fail "autoscaling.targetCPUUtilizationPercentage scales on CPU utilisation of the request, but resources.requests.cpu is not set: set it, or set autoscaling.targetCPUUtilizationPercentage to null" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) -}}
{{- fail "tls.enabled needs tls.existingSecret or tls.certManager.enabled" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled .Values.tls.existingSecret -}}
{{- fail "set tls.existingSecret or tls.certManager.enabled, not both" -}}
{{- end -}}
{{- if and .Values.migrations.auth.existingSecret .Values.migrations.auth.password -}}
{{- fail "migrations.auth: set existingSecret or password, not both" -}}
{{- end -}}
{{- if and .Values.postgres.auth.existingSecret .Values.postgres.auth.password -}}
{{- fail "postgres.auth: set existingSecret or password, not both" -}}
{{- end -}}
{{- if and .Values.cloudnativePG.enabled (not .Values.cloudnativePG.clusterName) -}}
{{- fail "cloudnativePG.enabled needs cloudnativePG.clusterName (the Cluster's metadata.name)" -}}
{{- end -}}
{{- if and .Values.cloudnativePG.enabled .Values.postgres.auth.password -}}
{{- fail "cloudnativePG.enabled reads the password from the Cluster's app Secret: leave postgres.auth.password empty" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- fail "ingress.enabled needs ingress.hosts" -}}
{{- end -}}
{{- if and .Values.grpcRoute.enabled (not .Values.grpcRoute.parentRefs) -}}
{{- fail "grpcRoute.enabled needs grpcRoute.parentRefs (the Gateway to attach to)" -}}
{{- end -}}
{{- if and .Values.postgres.sslRootCert.existingSecret (not (has .Values.postgres.sslMode (list "verify-ca" "verify-full"))) -}}
{{- fail "postgres.sslRootCert needs postgres.sslMode verify-ca or verify-full (the CA is only used to verify)" -}}
{{- end -}}
{{- if and .Values.redis.tls.ca.existingSecret (not .Values.redis.tls.enabled) -}}
{{- fail "redis.tls.ca needs redis.tls.enabled" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "standalone") .Values.redis.nodes -}}
{{- fail "redis.nodes is used only with redis.mode sentinel or cluster" -}}
{{- end -}}
{{- if and (ne .Values.redis.mode "standalone") (not .Values.redis.nodes) -}}
{{- fail (printf "redis.mode %s needs redis.nodes (host:port of the %s)" .Values.redis.mode (ternary "sentinels" "cluster's seed nodes" (eq .Values.redis.mode "sentinel"))) -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "sentinel") (not .Values.redis.sentinelMaster) -}}
{{- fail "redis.mode sentinel needs redis.sentinelMaster (the master's name in the sentinels)" -}}
{{- end -}}
{{- if and (ne .Values.redis.mode "sentinel") .Values.redis.sentinelMaster -}}
{{- fail "redis.sentinelMaster is used only with redis.mode sentinel" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "cluster") (ne (int .Values.redis.db) 0) -}}
{{- fail "redis.mode cluster needs redis.db 0 (a cluster has one database)" -}}
{{- end -}}
{{- if and .Values.admin.rpcsEnabled .Values.tls.enabled -}}
{{- fail "admin.rpcsEnabled has no effect with tls.enabled: under mTLS the administrative RPCs answer only the identities of their own tls.allowedCallersPerRpc entries (DeleteUser, GetUserDeletion, LiftSuppression, ExportUser); set it to false" -}}
{{- end -}}
{{- $listedAdminRpcs := list -}}
{{- if .Values.tls.enabled -}}
{{- range $rpc := list "DeleteUser" "GetUserDeletion" "LiftSuppression" "ExportUser" -}}
{{- if hasKey $.Values.tls.allowedCallersPerRpc $rpc -}}
{{- $listedAdminRpcs = append $listedAdminRpcs (printf "tls.allowedCallersPerRpc.%s" $rpc) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $adminOpenedBy := ternary (list "admin.rpcsEnabled") $listedAdminRpcs (and .Values.admin.rpcsEnabled (not .Values.tls.enabled)) -}}
{{- if and $adminOpenedBy (not .Values.suppressionKey.existingSecret) -}}
{{- fail (printf "the administrative RPCs opened by %s would answer FAILED_PRECONDITION without SUPPRESSION_KEY_FILE: set suppressionKey.existingSecret" (join ", " $adminOpenedBy)) -}}
{{- end -}}
{{- end -}}
