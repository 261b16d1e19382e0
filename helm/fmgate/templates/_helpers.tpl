{{/* Names and labels, as `helm create` makes them. */}}
{{- define "fmgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fmgate.fullname" -}}
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

{{- define "fmgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fmgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fmgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "fmgate.labels" -}}
helm.sh/chart: {{ include "fmgate.chart" . }}
{{ include "fmgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fmgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fmgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: tag defaults to <appVersion>-cpu or <appVersion>-cuda; a digest wins over the tag. */}}
{{- define "fmgate.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* More than one pod may run at once: Redis and shared storage matter. */}}
{{- define "fmgate.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "fmgate.adminSecretName" -}}
{{- .Values.adminKey.existingSecret | default (printf "%s-admin" (include "fmgate.fullname" .)) }}
{{- end }}

{{- define "fmgate.adminSecretKey" -}}
{{- ternary .Values.adminKey.existingSecretKey "admin-key" (ne .Values.adminKey.existingSecret "") }}
{{- end }}

{{- define "fmgate.redisFullname" -}}
{{- printf "%s-redis" (include "fmgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fmgate.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "fmgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{/*
A generated secret value that survives upgrades: reuse what the cluster holds, else make one.
Args: (list $ secretName key length). Offline (helm template) lookup is empty, so it is random.
*/}}
{{- define "fmgate.keptRandom" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $key := index . 2 }}
{{- $len := index . 3 }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $name }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum $len }}
{{- end }}
{{- end }}

{{/*
Threads per engine: fmgate.threads if set, else the whole CPUs of limits.cpu or requests.cpu
("1500m" -> 1, "2" -> 2), at least 1; 0 (all cores) only when neither is set.
*/}}
{{- define "fmgate.threads" -}}
{{- if .Values.fmgate.threads }}
{{- .Values.fmgate.threads }}
{{- else }}
{{- $res := .Values.resources | default dict }}
{{- $cpu := toString (dig "limits" "cpu" (dig "requests" "cpu" "" $res) $res) }}
{{- if not $cpu }}
{{- 0 }}
{{- else if hasSuffix "m" $cpu }}
{{- max 1 (div (trimSuffix "m" $cpu | int64) 1000) }}
{{- else }}
{{- max 1 (floor (float64 $cpu) | int64) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod's grace period: explicit, or preStop + ceil(shutdown grace) + 15 s of margin. */}}
{{- define "fmgate.terminationGracePeriod" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int (ceil .Values.fmgate.shutdownGraceSeconds)) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else }}
{{- $set := int .Values.terminationGracePeriodSeconds }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + fmgate.shutdownGraceSeconds (%d), or requests are cut off mid-drain" $set $drain) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/* Checks that no schema can express across keys. */}}
{{- define "fmgate.validate" -}}
{{- if and .Values.redis.builtin.enabled (or .Values.redis.url .Values.redis.existingSecret) }}
{{- fail "redis: set one of redis.url, redis.existingSecret or redis.builtin.enabled, not several" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "redis: set one of redis.url and redis.existingSecret, not both" }}
{{- end }}
{{- if and (include "fmgate.multiReplica" .) (not (has .Values.modelCache.type (list "emptyDir" "shared"))) }}
{{- fail "modelCache: with more than one replica use modelCache.type=emptyDir or shared. FMGATE_HOME also holds each pod's SQLite key and usage database (WAL mode), which must not be shared between pods or put on network storage" }}
{{- end }}
{{- if and (include "fmgate.multiReplica" .) (ne .Values.fmgate.auth "off") (not (or .Values.redis.url .Values.redis.existingSecret .Values.redis.builtin.enabled)) }}
{{- fail "redis: more than one replica needs Redis (redis.url, redis.existingSecret or redis.builtin.enabled): without it each pod has its own keys and quota counters" }}
{{- end }}
{{- if and (eq .Values.modelCache.type "existingClaim") (not .Values.modelCache.pvc.existingClaim) }}
{{- fail "modelCache.type=existingClaim needs modelCache.pvc.existingClaim" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.queueDepth.enabled) (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) }}
{{- fail "autoscaling: give targetCPUUtilizationPercentage or enable queueDepth" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling: minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}

{{/* The shared-cache build Job: on when modelCache.type=shared and buildJob.enabled. */}}
{{- define "fmgate.buildJob" -}}
{{- if and (eq .Values.modelCache.type "shared") .Values.modelCache.shared.buildJob.enabled }}true{{ end }}
{{- end }}

{{/* The Job's name changes with what it builds (models, image), so an upgrade that changes them
runs a new Job; Job pod templates cannot be changed in place. */}}
{{- define "fmgate.buildJobName" -}}
{{- $sum := list .Values.models (include "fmgate.image" .) | toJson | sha256sum | trunc 8 }}
{{- printf "%s-build-%s" (include "fmgate.fullname" . | trunc 48 | trimSuffix "-") $sum }}
{{- end }}

{{- define "fmgate.buildSelectorLabels" -}}
app.kubernetes.io/name: {{ include "fmgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: model-build
{{- end }}

{{/* `fmgate models pull` of each configured model, one container each (run in order as init
containers): the same FMGATE_HOME, shared cache mount and environment as the gateway.
Args: (list $ resources tolerant). tolerant: a failed pull does not stop the pod (the gateway's init
containers: one broken model must not keep the others from serving; the gateway reports it). */}}
{{- define "fmgate.pullContainers" -}}
{{- $ := index . 0 }}
{{- $resources := index . 1 }}
{{- $tolerant := index . 2 }}
{{- range $i, $m := $.Values.models }}
- name: {{ printf "pull-%d" $i }}
  image: {{ include "fmgate.image" $ | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- $args := list "models" "pull" $m.source "--task" ($m.task | default "chat") "--variant" ($m.variant | default "auto") }}
  {{- if $tolerant }}
  command: ["/bin/sh", "-c", "fmgate \"$@\" || echo \"fmgate: $3 did not build here; the gateway reports its error\" >&2", "pull"]
  {{- end }}
  args: {{ toJson $args }}
  {{- with $.Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: FMGATE_HOME
      value: {{ $.Values.modelCache.mountPath | quote }}
    - name: FMGATE_LOG_LEVEL
      value: {{ $.Values.fmgate.logLevel | quote }}
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: {{ printf "%s/huggingface" $.Values.modelCache.mountPath | quote }}
    - name: XDG_CACHE_HOME
      value: /tmp/cache
    - name: TMPDIR
      value: /tmp
    {{- with $.Values.fmgate.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $.Values.fmgate.extraEnvFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model-cache
      mountPath: {{ $.Values.modelCache.mountPath }}
    - name: shared-models
      mountPath: {{ printf "%s/models" $.Values.modelCache.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* The gateway container's resources, GPU included. */}}
{{- define "fmgate.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.enabled }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .Values.gpu.resourceName (.Values.gpu.count | int) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}
