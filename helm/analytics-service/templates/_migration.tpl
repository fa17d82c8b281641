{{/*
Spec of the migration Job. Rendered into a variable first, so that in job mode the Job's
name can carry a hash of exactly what Kubernetes refuses to change in place.
Call with (dict "root" $ "hook" BOOL "auth" MIGRATION_AUTH "configMapName" NAME).
*/}}
{{- define "analytics-service.migrationJobSpec" -}}
{{- $root := .root -}}
{{- with .root -}}
backoffLimit: {{ .Values.migrations.backoffLimit }}
activeDeadlineSeconds: {{ .Values.migrations.activeDeadlineSeconds }}
{{- /* A TTL would delete a job-mode Job, which is a tracked release resource: Argo CD
then reports it Missing and self-heal re-runs it, Flux re-applies it. Hook Jobs are not
tracked, so the TTL only tidies up. */}}
{{- if $.hook }}
ttlSecondsAfterFinished: {{ .Values.migrations.ttlSecondsAfterFinished }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "analytics-service.labels" . | nindent 6 }}
      app.kubernetes.io/component: migrations
    annotations:
      # A new configuration is a new spec (and in job mode a new Job): partitions and
      # self-tracking follow the settings the server runs with.
      checksum/config: {{ include "analytics-service.configData" . | sha256sum }}
      {{- with .Values.migrations.revision }}
      analytics-service/migrations-revision: {{ . | quote }}
      {{- end }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "analytics-service.migrationServiceAccountName" . }}
    automountServiceAccountToken: false
    enableServiceLinks: false
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    containers:
      - name: migrate
        image: {{ include "analytics-service.image" . }}
        imagePullPolicy: {{ include "analytics-service.imagePullPolicy" . }}
        # Applies pending migrations under a PostgreSQL advisory lock, then exits 0.
        args:
          - migrate
        # The server's own settings (same ConfigMap data), so self-tracking, the event
        # window and retention cannot drift between the Job and the pods.
        envFrom:
          - configMapRef:
              name: {{ $.configMapName }}
          {{- with .Values.envFrom }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        env:
          {{- include "analytics-service.postgresCredentialEnv" (dict "secretName" (include "analytics-service.migrationSecretName" .) "auth" $.auth) | trim | nindent 10 }}
          {{- with include "analytics-service.otlpHeadersEnv" . | trim }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with .Values.config.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- /* Start-up reads every CA file the configuration names. */}}
        {{- with include "analytics-service.dependencyCaVolumeMounts" . | trim }}
        volumeMounts:
          {{- . | nindent 10 }}
        {{- end }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        resources:
          {{- toYaml .Values.migrations.resources | nindent 10 }}
    {{- with include "analytics-service.dependencyCaVolumes" . | trim }}
    volumes:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with .Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}
{{- end -}}
