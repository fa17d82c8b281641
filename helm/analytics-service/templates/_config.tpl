{{/*
Non-secret settings of the binary, as ConfigMap data. The server, its schema-wait init
container and the migration Job all read them from a ConfigMap with exactly this data, so
they cannot disagree (in hook mode the Job reads a hook copy: a pre-install hook runs before
the release's ConfigMap exists).
*/}}
{{- define "analytics-service.configData" -}}
SERVICE_PORT: {{ .Values.service.grpcPort | quote }}
PROMETHEUS_PORT: {{ .Values.service.adminPort | quote }}
SERVICE_NAME: {{ .Values.config.serviceName | quote }}
LOG_LEVEL: {{ .Values.config.logLevel | quote }}
LOG_FORMAT: {{ .Values.config.logFormat | quote }}
REQUEST_TIMEOUT_SECONDS: {{ .Values.config.requestTimeoutSeconds | quote }}
GRPC_MAX_MESSAGE_BYTES: {{ .Values.config.grpcMaxMessageBytes | int64 | quote }}
GRPC_MAX_CONNECTION_AGE_SECONDS: {{ .Values.config.grpcMaxConnectionAgeSeconds | quote }}
GRPC_MAX_CONCURRENT_STREAMS: {{ .Values.config.grpcMaxConcurrentStreams | quote }}
GRPC_MAX_HEADER_LIST_BYTES: {{ .Values.config.grpcMaxHeaderListBytes | quote }}
GRPC_HANDSHAKE_TIMEOUT_SECONDS: {{ .Values.config.grpcHandshakeTimeoutSeconds | quote }}
GRPC_MAX_PENDING_TLS_HANDSHAKES: {{ .Values.config.grpcMaxPendingTlsHandshakes | quote }}
GRPC_KEEPALIVE_INTERVAL_SECONDS: {{ .Values.config.grpcKeepaliveIntervalSeconds | quote }}
GRPC_KEEPALIVE_TIMEOUT_SECONDS: {{ .Values.config.grpcKeepaliveTimeoutSeconds | quote }}
SHUTDOWN_DRAIN_SECONDS: {{ .Values.shutdownDrainSeconds | quote }}
RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE: {{ .Values.config.rateLimitEventsPerUserPerMinute | quote }}
RATE_LIMIT_EXPECTED_REPLICAS: {{ .Values.config.rateLimitExpectedReplicas | quote }}
{{- with .Values.config.rateLimitLeaseTokens }}
RATE_LIMIT_LEASE_TOKENS: {{ . | quote }}
{{- end }}
EVENT_MAX_AGE_DAYS: {{ .Values.config.eventMaxAgeDays | quote }}
EVENT_RETENTION_DAYS: {{ .Values.config.eventRetentionDays | quote }}
MIGRATE_ON_START: {{ .Values.config.migrateOnStart | quote }}
DB_RETRY_MAX_ATTEMPTS: {{ .Values.config.dbRetryMaxAttempts | quote }}
DB_RETRY_BASE_DELAY_MS: {{ .Values.config.dbRetryBaseDelayMs | quote }}
HEALTH_POLL_INTERVAL_MS: {{ .Values.config.healthPollIntervalMs | quote }}
READINESS_REQUIRES_DATABASE: {{ .Values.config.readinessRequiresDatabase | quote }}
SELF_TRACKING: {{ .Values.config.selfTracking | quote }}
SERVICE_BIND_ADDRESS: {{ .Values.config.bindAddress | quote }}
INGEST_BATCH_SIZE: {{ .Values.config.ingest.batchSize | quote }}
INGEST_LINGER_MS: {{ .Values.config.ingest.lingerMs | quote }}
INGEST_QUEUE_CAPACITY: {{ .Values.config.ingest.queueCapacity | quote }}
INGEST_WRITERS: {{ .Values.config.ingest.writers | quote }}
INGEST_COMMIT_TIMEOUT_MS: {{ .Values.config.ingest.commitTimeoutMs | quote }}
IDEMPOTENCY_WINDOW_DAYS: {{ .Values.config.ingest.idempotencyWindowDays | quote }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .Values.config.otel.endpoint | quote }}
OTEL_TRACES_SAMPLER_RATIO: {{ .Values.config.otel.samplerRatio | toString | quote }}
{{- with .Values.config.otel.certificate }}
{{- if .existingSecret }}
OTEL_EXPORTER_OTLP_CERTIFICATE: {{ printf "%s/%s" .mountPath .secretKey | quote }}
{{- end }}
{{- end }}
POSTGRES_HOST: {{ include "analytics-service.postgresHost" . | quote }}
POSTGRES_PORT: {{ .Values.postgres.port | quote }}
POSTGRES_DB: {{ include "analytics-service.postgresDatabase" . | quote }}
POSTGRES_SSLMODE: {{ .Values.postgres.sslMode | quote }}
{{- with .Values.postgres.sslRootCert }}
{{- if .existingSecret }}
POSTGRES_SSL_ROOT_CERT: {{ printf "%s/%s" .mountPath .secretKey | quote }}
{{- end }}
{{- end }}
POSTGRES_MAX_CONNECTIONS: {{ .Values.postgres.maxConnections | quote }}
POSTGRES_ACQUIRE_TIMEOUT_MS: {{ .Values.postgres.acquireTimeoutMs | quote }}
POSTGRES_POOLER: {{ include "analytics-service.postgresPooler" . | quote }}
{{- with include "analytics-service.migrationPostgresHost" . }}
MIGRATION_POSTGRES_HOST: {{ . | quote }}
{{- end }}
{{- with .Values.postgres.migration.port }}
MIGRATION_POSTGRES_PORT: {{ . | quote }}
{{- end }}
REDIS_MODE: {{ .Values.redis.mode | quote }}
{{- if ne .Values.redis.mode "standalone" }}
REDIS_NODES: {{ join "," .Values.redis.nodes | quote }}
{{- end }}
{{- if eq .Values.redis.mode "sentinel" }}
REDIS_SENTINEL_MASTER: {{ .Values.redis.sentinelMaster | quote }}
{{- end }}
POSTGRES_READ_HOST: {{ .Values.postgres.readHost | quote }}
POSTGRES_READ_PORT: {{ .Values.postgres.readPort | default "" | toString | quote }}
POSTGRES_READ_MAX_CONNECTIONS: {{ .Values.postgres.readMaxConnections | quote }}
REDIS_HOST: {{ .Values.redis.host | quote }}
REDIS_PORT: {{ .Values.redis.port | quote }}
REDIS_DB: {{ .Values.redis.db | quote }}
REDIS_CACHE_TTL: {{ .Values.redis.cacheTtlSeconds | quote }}
REDIS_KEY_PREFIX: {{ .Values.redis.keyPrefix | quote }}
REDIS_TIMEOUT_MS: {{ .Values.redis.timeoutMs | quote }}
REDIS_USERNAME: {{ .Values.redis.auth.username | quote }}
REDIS_TLS: {{ .Values.redis.tls.enabled | quote }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.ca.existingSecret }}
REDIS_TLS_CA_FILE: {{ printf "%s/%s" .Values.redis.tls.ca.mountPath .Values.redis.tls.ca.secretKey | quote }}
{{- end }}
PII_FIELDS: {{ join "," .Values.pii.fields | quote }}
{{- if .Values.pii.keys.existingSecret }}
PII_KEYS_FILE: {{ printf "%s/%s" .Values.pii.keys.mountPath .Values.pii.keys.secretKey | quote }}
{{- end }}
{{- if .Values.suppressionKey.existingSecret }}
SUPPRESSION_KEY_FILE: {{ printf "%s/%s" .Values.suppressionKey.mountPath .Values.suppressionKey.secretKey | quote }}
{{- end }}
ADMIN_RPCS_ENABLED: {{ .Values.admin.rpcsEnabled | quote }}
{{- if .Values.tls.enabled }}
TLS_CERT_FILE: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
TLS_KEY_FILE: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
TLS_CLIENT_CA_FILE: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
TLS_ALLOWED_CALLERS: {{ join "," .Values.tls.allowedCallers | quote }}
{{- $perRpc := list }}
{{- range $rpc, $callers := .Values.tls.allowedCallersPerRpc }}
{{- $perRpc = append $perRpc (printf "%s=%s" $rpc (join "|" $callers)) }}
{{- end }}
TLS_ALLOWED_CALLERS_PER_RPC: {{ join ";" $perRpc | quote }}
TLS_ALLOWED_CALLERS_COVER_REFLECTION: {{ .Values.tls.allowedCallersCoverReflection | quote }}
TLS_RELOAD_INTERVAL_SECONDS: {{ .Values.tls.reloadIntervalSeconds | quote }}
{{- end }}
{{- end -}}
