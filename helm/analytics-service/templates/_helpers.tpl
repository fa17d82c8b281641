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

{{/* Labels on every resource. */}}
{{- define "analytics-service.labels" -}}
helm.sh/chart: {{ include "analytics-service.chart" . }}
{{ include "analytics-service.selectorLabels" . }}
app.kubernetes.io/version: {{ include "analytics-service.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: analytics-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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

{{/*
checkov skip annotations (checkov.io/skipN: CHECK=reason) for the workloads this chart
renders. Each skip is rendered only while the condition that justifies it holds.
Call with (dict "root" $ "kind" "server|migrations|test").
*/}}
{{- define "analytics-service.checkovSkips" -}}
{{- $root := .root -}}
{{- $skips := list -}}
{{- if ne .kind "test" -}}
{{- $skips = append $skips "CKV_K8S_35=the binary reads credentials from environment variables only (POSTGRES_PASSWORD, REDIS_PASSWORD); they come from secretKeyRef and are never logged" -}}
{{- end -}}
{{- if not $root.Values.image.digest -}}
{{- $skips = append $skips "CKV_K8S_43=image.digest is empty in these values; production values pin the image by digest" -}}
{{- if and $root.Values.image.pullPolicy (ne $root.Values.image.pullPolicy "Always") -}}
{{- $skips = append $skips (printf "CKV_K8S_15=image.pullPolicy %s chosen in values for an image loaded into a local cluster (Tilt/kind)" $root.Values.image.pullPolicy) -}}
{{- end -}}
{{- end -}}
{{- if not $root.Values.networkPolicy.enabled -}}
{{- $skips = append $skips "CKV2_K8S_6=NetworkPolicy is opt-in (networkPolicy.enabled) because its peers depend on the cluster" -}}
{{- end -}}
{{- if eq .kind "test" -}}
{{- $skips = append $skips "CKV_K8S_8=helm test pod runs one health check to completion; a liveness probe does not apply" -}}
{{- $skips = append $skips "CKV_K8S_9=helm test pod runs one health check to completion; a readiness probe does not apply" -}}
{{- end -}}
{{- range $index, $skip := $skips }}
checkov.io/skip{{ add1 $index }}: {{ $skip | quote }}
{{- end -}}
{{- end -}}

{{/* Settings ---------------------------------------------------------------------------- */}}
{{- define "analytics-service.postgresSecretName" -}}
{{- default (printf "%s-credentials" (include "analytics-service.fullname" .)) .Values.postgres.auth.existingSecret -}}
{{- end -}}

{{- define "analytics-service.redisSecretName" -}}
{{- default (printf "%s-credentials" (include "analytics-service.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* Does the chart create the runtime credentials Secret? */}}
{{- define "analytics-service.createCredentialsSecret" -}}
{{- if or (not .Values.postgres.auth.existingSecret) (and .Values.redis.host (not .Values.redis.auth.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/*
Does the chart render the RELEASE-migrate-credentials Secret? Either for the migrations' own
password, or in hook mode as a hook copy of the runtime password: a pre-install hook Job
runs before the release's ordinary Secret exists.
*/}}
{{- define "analytics-service.migrationCreatesSecret" -}}
{{- if and (ne .Values.migrations.mode "external") (not .Values.migrations.auth.existingSecret) -}}
{{- if or .Values.migrations.auth.password .Values.migrations.auth.username -}}
true
{{- else if and (eq .Values.migrations.mode "hook") (not .Values.postgres.auth.existingSecret) -}}
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
{{- $username := default .Values.postgres.auth.username $own.username -}}
{{- if $own.existingSecret -}}
{{- toYaml (dict "username" $username "usernameKey" $own.usernameKey "passwordKey" $own.passwordKey) -}}
{{- else if include "analytics-service.migrationCreatesSecret" . -}}
{{- toYaml (dict "username" $username "usernameKey" "" "passwordKey" "postgres-password") -}}
{{- else -}}
{{- toYaml (dict "username" .Values.postgres.auth.username "usernameKey" .Values.postgres.auth.usernameKey "passwordKey" .Values.postgres.auth.passwordKey) -}}
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
{{ include "analytics-service.postgresCredentialEnv" (dict "secretName" (include "analytics-service.postgresSecretName" .) "auth" .Values.postgres.auth) }}
{{- if .Values.redis.host }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "analytics-service.redisSecretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
{{- end }}
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
    - namespaceSelector:
        {{- toYaml .namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .podSelector | nindent 8 }}
  ports:
    - protocol: UDP
      port: {{ .port }}
    - protocol: TCP
      port: {{ .port }}
{{- end -}}
{{- define "analytics-service.postgresEgressRule" -}}
- ports:
    - protocol: TCP
      port: {{ .Values.postgres.port }}
  {{- with .Values.networkPolicy.egress.postgresTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Validation: fail the render on inconsistent settings. ------------------------------- */}}
{{- define "analytics-service.validate" -}}
{{- $needed := add .Values.preStopSleepSeconds .Values.shutdownDrainSeconds 5 -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds (%d) + shutdownDrainSeconds (%d) + 5 = %d, or SIGKILL cuts the drain short" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds) (int .Values.shutdownDrainSeconds) (int $needed)) -}}
{{- end -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (ne (toString $pdb.minAvailable) "") (not (kindIs "invalid" $pdb.maxUnavailable)) (ne (toString $pdb.maxUnavailable) "") -}}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both" -}}
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
{{- if and .Values.postgres.sslRootCert.existingSecret (not (has .Values.postgres.sslMode (list "verify-ca" "verify-full"))) -}}
{{- fail "postgres.sslRootCert needs postgres.sslMode verify-ca or verify-full (the CA is only used to verify)" -}}
{{- end -}}
{{- if and .Values.redis.tls.ca.existingSecret (not .Values.redis.tls.enabled) -}}
{{- fail "redis.tls.ca needs redis.tls.enabled" -}}
{{- end -}}
{{- end -}}
