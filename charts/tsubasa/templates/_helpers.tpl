{{/* ---------------------------------------------------------------- names and labels */}}

{{- define "tsubasa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name; kept to 40 characters because KubeRay appends suffixes (-raycluster-xxxxx-head-svc). */}}
{{- define "tsubasa.fullname" -}}
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

{{- define "tsubasa.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tsubasa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tsubasa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tsubasa.labels" -}}
helm.sh/chart: {{ include "tsubasa.chart" . }}
{{ include "tsubasa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tsubasa
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "ingest") */}}
{{- define "tsubasa.componentLabels" -}}
{{ include "tsubasa.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tsubasa.componentSelector" -}}
{{ include "tsubasa.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tsubasa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tsubasa.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}

{{- define "tsubasa.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tsubasa.gpuImage" -}}
{{- printf "%s:%s" .Values.image.gpu.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpu.tag) }}
{{- end }}

{{/* ---------------------------------------------------------------- wiring */}}

{{- define "tsubasa.milvusUri" -}}
{{- if .Values.milvus.enabled }}
{{- printf "http://%s-milvus:19530" .Release.Name }}
{{- else if .Values.milvusLite.enabled }}
{{- printf "http://%s-milvus-lite:%d" (include "tsubasa.fullname" .) (int .Values.milvusLite.port) }}
{{- else }}
{{- .Values.externalMilvus.uri }}
{{- end }}
{{- end }}

{{- define "tsubasa.kafkaBootstrap" -}}
{{- if .Values.kafka.bootstrapServers }}
{{- .Values.kafka.bootstrapServers }}
{{- else }}
{{- $ns := default .Release.Namespace .Values.kafka.strimzi.namespace }}
{{- printf "%s-kafka-bootstrap.%s.svc:9092" .Values.kafka.strimzi.clusterName $ns }}
{{- end }}
{{- end }}

{{- define "tsubasa.adapterRoot" -}}
{{- if eq .Values.adapters.storage "s3" }}
{{- .Values.adapters.s3.url }}
{{- else }}
{{- .Values.adapters.pvc.mountPath }}
{{- end }}
{{- end }}

{{- define "tsubasa.adapterClaim" -}}
{{- default (printf "%s-adapters" (include "tsubasa.fullname" .)) .Values.adapters.pvc.existingClaim }}
{{- end }}

{{- define "tsubasa.configMapName" -}}
{{- printf "%s-config" (include "tsubasa.fullname" .) }}
{{- end }}

{{/* The TSUBASA_CONFIG document: user settings with the chart-owned wiring on top. */}}
{{- define "tsubasa.configDocument" -}}
{{- $owned := dict
  "data_dir" "/var/lib/tsubasa"
  "milvus" (dict "uri" (include "tsubasa.milvusUri" .))
  "kafka" (dict
    "bootstrap_servers" (include "tsubasa.kafkaBootstrap" .)
    "topic" .Values.kafka.topics.events.name
    "dead_letter_topic" .Values.kafka.topics.deadLetter.name
    "group_id" .Values.kafka.groupId)
  "adapters" (dict "root" (include "tsubasa.adapterRoot" .))
  "distill" (dict "work_dir" (include "tsubasa.distillWorkDir" .))
  "serve" (dict "host" "0.0.0.0" "port" 8000)
}}
{{- $_ := set $owned.kafka "security_protocol" .Values.kafka.securityProtocol }}
{{- $_ := set $owned.kafka "partitions" (int .Values.kafka.topics.events.partitions) }}
{{- if .Values.kafka.sasl.username }}
{{- $_ := set $owned.kafka "sasl_username" .Values.kafka.sasl.username }}
{{- $_ := set $owned.kafka "sasl_mechanism" .Values.kafka.saslMechanism }}
{{- end }}
{{- $doc := mergeOverwrite (deepCopy .Values.config) $owned }}
{{- toYaml $doc }}
{{- end }}

{{/* Environment shared by every TSUBASA container: the config file and Secret references only. */}}
{{- define "tsubasa.env" -}}
- name: TSUBASA_CONFIG
  value: /etc/tsubasa/config.yaml
- name: TSUBASA_CACHE_DIR
  value: /var/cache/tsubasa
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath }}
- name: TSUBASA_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeys.existingSecret }}
      key: {{ .Values.apiKeys.secretKey }}
{{- if and .Values.externalMilvus.existingSecret (not .Values.milvusLite.enabled) }}
- name: TSUBASA_MILVUS__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalMilvus.existingSecret }}
      key: {{ .Values.externalMilvus.secretKey }}
{{- end }}
{{- if .Values.kafka.sasl.existingSecret }}
- name: TSUBASA_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.secretKey }}
{{- end }}
{{- if .Values.huggingface.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingface.existingSecret }}
      key: {{ .Values.huggingface.secretKey }}
{{- end }}
{{- if eq .Values.adapters.storage "s3" }}
- name: AWS_REGION
  value: {{ .Values.adapters.s3.region | quote }}
{{- with .Values.adapters.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.adapters.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.adapters.s3.existingSecret }}
      key: {{ .Values.adapters.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.adapters.s3.existingSecret }}
      key: {{ .Values.adapters.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes every TSUBASA pod mounts: (dict "ctx" $ "shmSize" "32Gi"|"") */}}
{{- define "tsubasa.volumes" -}}
{{- $ := .ctx -}}
- name: config
  configMap:
    name: {{ include "tsubasa.configMapName" $ }}
- name: data
  emptyDir: {}
- name: cache
  emptyDir: {}
- name: models
{{- if $.Values.modelCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $.Values.modelCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $.Values.modelCache.emptyDirSizeLimit }}
{{- end }}
{{- if eq $.Values.adapters.storage "pvc" }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "tsubasa.adapterClaim" $ }}
{{- end }}
{{- if .shmSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}
{{- end }}

{{- define "tsubasa.volumeMounts" -}}
{{- $ := .ctx -}}
- name: config
  mountPath: /etc/tsubasa
  readOnly: true
- name: data
  mountPath: /var/lib/tsubasa
- name: cache
  mountPath: /var/cache/tsubasa
- name: models
  mountPath: {{ $.Values.modelCache.mountPath }}
{{- if eq $.Values.adapters.storage "pvc" }}
- name: adapters
  mountPath: {{ $.Values.adapters.pvc.mountPath }}
{{- end }}
{{- if .shmSize }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* GPU resources: the group's resources with the GPU count set in requests and limits.
     (dict "resources" map "gpus" int "name" "nvidia.com/gpu") */}}
{{- define "tsubasa.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- $req := default dict (get $res "requests") }}
{{- $lim := default dict (get $res "limits") }}
{{- $_ := set $req .name (int .gpus) }}
{{- $_ := set $lim .name (int .gpus) }}
{{- $_ := set $res "requests" $req }}
{{- $_ := set $res "limits" $lim }}
{{- toYaml $res }}
{{- end }}

{{/* Ray start params are strings in the CRD: quote every value. */}}
{{- define "tsubasa.rayStartParams" -}}
{{- $out := dict }}
{{- range $k, $v := . }}
{{- $_ := set $out $k (toString $v) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* ---------------------------------------------------------------- validation */}}

{{/* (list "path.in.values" value): fail unless value is a map (nil allowed). */}}
{{- define "tsubasa.assertMap" -}}
{{- $path := index . 0 }}{{- $v := index . 1 }}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) }}
{{- fail (printf "values: %s must be a map (key: value), got %s %s; e.g. `%s: {key: value}`" $path (kindOf $v) (toJson $v) $path) }}
{{- end }}
{{- end }}

{{- define "tsubasa.assertList" -}}
{{- $path := index . 0 }}{{- $v := index . 1 }}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "slice" $v)) }}
{{- fail (printf "values: %s must be a list, got %s %s; e.g. `%s: [...]`" $path (kindOf $v) (toJson $v) $path) }}
{{- end }}
{{- end }}

{{- define "tsubasa.assertOneOf" -}}
{{- $path := index . 0 }}{{- $v := index . 1 }}{{- $allowed := index . 2 }}
{{- if not (has $v $allowed) }}
{{- fail (printf "values: %s must be one of %s, got %s" $path (join ", " $allowed) (toJson $v)) }}
{{- end }}
{{- end }}

{{- define "tsubasa.assertPositiveInt" -}}
{{- $path := index . 0 }}{{- $v := index . 1 }}{{- $min := index . 2 }}
{{- if not (or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "float64" $v)) }}
{{- fail (printf "values: %s must be a whole number, got %s %s" $path (kindOf $v) (toJson $v)) }}
{{- end }}
{{- if or (lt (float64 $v) (float64 $min)) (ne (float64 $v) (float64 (int64 $v))) }}
{{- fail (printf "values: %s must be a whole number >= %d, got %s" $path (int $min) (toJson $v)) }}
{{- end }}
{{- end }}

{{/* Worker group bounds: (list "path" group) */}}
{{- define "tsubasa.assertReplicas" -}}
{{- $path := index . 0 }}{{- $g := index . 1 }}
{{- include "tsubasa.assertPositiveInt" (list (printf "%s.minReplicas" $path) $g.minReplicas 0) }}
{{- include "tsubasa.assertPositiveInt" (list (printf "%s.maxReplicas" $path) $g.maxReplicas 1) }}
{{- include "tsubasa.assertPositiveInt" (list (printf "%s.replicas" $path) $g.replicas 0) }}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "values: %s needs minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $path (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}

{{/* Pod placement values of one group: (list "path" group) */}}
{{- define "tsubasa.assertPlacement" -}}
{{- $path := index . 0 }}{{- $g := index . 1 }}
{{- include "tsubasa.assertMap" (list (printf "%s.resources" $path) $g.resources) }}
{{- if kindIs "map" $g.resources }}
{{- include "tsubasa.assertMap" (list (printf "%s.resources.requests" $path) $g.resources.requests) }}
{{- include "tsubasa.assertMap" (list (printf "%s.resources.limits" $path) $g.resources.limits) }}
{{- end }}
{{- include "tsubasa.assertMap" (list (printf "%s.nodeSelector" $path) $g.nodeSelector) }}
{{- include "tsubasa.assertList" (list (printf "%s.tolerations" $path) $g.tolerations) }}
{{- include "tsubasa.assertMap" (list (printf "%s.affinity" $path) $g.affinity) }}
{{- if hasKey $g "rayStartParams" }}
{{- include "tsubasa.assertMap" (list (printf "%s.rayStartParams" $path) $g.rayStartParams) }}
{{- end }}
{{- end }}

{{/* Every check; included once by templates/validate.yaml so a bad value stops the render. */}}
{{- define "tsubasa.validate" -}}
{{- $v := .Values }}
{{- include "tsubasa.assertMap" (list "config" $v.config) }}
{{- if kindIs "map" $v.config }}
{{- range $section, $body := $v.config }}
{{- include "tsubasa.assertMap" (list (printf "config.%s" $section) $body) }}
{{- end }}
{{- end }}
{{- include "tsubasa.assertMap" (list "commonLabels" $v.commonLabels) }}
{{- include "tsubasa.assertList" (list "extraEnv" $v.extraEnv) }}
{{- include "tsubasa.assertList" (list "extraEnvFrom" $v.extraEnvFrom) }}
{{- include "tsubasa.assertList" (list "imagePullSecrets" $v.imagePullSecrets) }}
{{- include "tsubasa.assertMap" (list "serviceAccount.annotations" $v.serviceAccount.annotations) }}
{{- include "tsubasa.assertMap" (list "podSecurityContext" $v.podSecurityContext) }}
{{- include "tsubasa.assertMap" (list "securityContext" $v.securityContext) }}
{{- include "tsubasa.assertMap" (list "ray.authOptions" $v.ray.authOptions) }}
{{- include "tsubasa.assertMap" (list "metrics.serviceMonitor.labels" $v.metrics.serviceMonitor.labels) }}
{{- include "tsubasa.assertList" (list "networkPolicy.servePeers" $v.networkPolicy.servePeers) }}
{{- range $k := list "password" "apiKey" "token" "secretAccessKey" "accessKeyId" }}
{{- if hasKey $v $k }}
{{- fail (printf "values: %s looks like a secret; secrets are never given as values, reference a Secret instead (docs/deploy.md)" $k) }}
{{- end }}
{{- end }}
{{- if or (hasKey $v.apiKeys "keys") (hasKey $v.apiKeys "value") }}
{{- fail "values: API keys are never given as values; create a Secret and set apiKeys.existingSecret (docs/deploy.md)" }}
{{- end }}
{{- if not $v.apiKeys.existingSecret }}
{{- fail "values: apiKeys.existingSecret is required: a Secret with `tenant:sha256hex,...` (docs/deploy.md, 'API keys')" }}
{{- end }}
{{- if kindIs "map" $v.config }}
{{- range $section := list "milvus" "kafka" "eval" }}
{{- $body := get $v.config $section }}
{{- if kindIs "map" $body }}
{{- range $k := list "token" "sasl_password" "judge_api_key" }}
{{- if hasKey $body $k }}
{{- fail (printf "values: config.%s.%s is a secret; reference a Secret instead (externalMilvus.existingSecret, kafka.sasl.existingSecret, extraEnv)" $section $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{/* vector store: the subchart or milvus-lite, else the external URI */}}
{{- if and $v.milvus.enabled $v.milvusLite.enabled }}
{{- fail "values: milvus.enabled and milvusLite.enabled are both true; choose one vector store" }}
{{- end }}
{{- if not (or $v.milvus.enabled $v.milvusLite.enabled $v.externalMilvus.uri) }}
{{- fail "values: no vector store: set externalMilvus.uri, or milvus.enabled (subchart) or milvusLite.enabled (dev)" }}
{{- end }}
{{- include "tsubasa.assertMap" (list "milvusLite.resources" $v.milvusLite.resources) }}
{{/* kafka */}}
{{- if and (not $v.kafka.strimzi.enabled) (not $v.kafka.bootstrapServers) }}
{{- fail "values: kafka.bootstrapServers is required when kafka.strimzi.enabled is false" }}
{{- end }}
{{- include "tsubasa.assertOneOf" (list "kafka.strimzi.apiVersion" $v.kafka.strimzi.apiVersion (list "kafka.strimzi.io/v1" "kafka.strimzi.io/v1beta2")) }}
{{- range $key := list "events" "deadLetter" }}
{{- $t := get $v.kafka.topics $key }}
{{- if not (kindIs "map" $t) }}
{{- fail (printf "values: kafka.topics.%s must be a map with name, partitions, replicas, config" $key) }}
{{- end }}
{{- if not $t.name }}
{{- fail (printf "values: kafka.topics.%s.name is required" $key) }}
{{- end }}
{{- include "tsubasa.assertPositiveInt" (list (printf "kafka.topics.%s.partitions" $key) $t.partitions 1) }}
{{- include "tsubasa.assertPositiveInt" (list (printf "kafka.topics.%s.replicas" $key) $t.replicas 1) }}
{{- include "tsubasa.assertMap" (list (printf "kafka.topics.%s.config" $key) $t.config) }}
{{- end }}
{{- include "tsubasa.assertOneOf" (list "kafka.securityProtocol" $v.kafka.securityProtocol (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) }}
{{- include "tsubasa.assertOneOf" (list "kafka.saslMechanism" $v.kafka.saslMechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512")) }}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not (and $v.kafka.sasl.username $v.kafka.sasl.existingSecret)) }}
{{- fail (printf "values: kafka.securityProtocol=%s needs kafka.sasl.username and kafka.sasl.existingSecret" $v.kafka.securityProtocol) }}
{{- end }}
{{- if eq $v.kafka.topics.events.name $v.kafka.topics.deadLetter.name }}
{{- fail "values: kafka.topics.deadLetter.name must differ from kafka.topics.events.name" }}
{{- end }}
{{/* adapters */}}
{{- include "tsubasa.assertOneOf" (list "adapters.storage" $v.adapters.storage (list "pvc" "s3")) }}
{{- if eq $v.adapters.storage "s3" }}
{{- if not (hasPrefix "s3://" $v.adapters.s3.url) }}
{{- fail (printf "values: adapters.s3.url must start with s3://, got %s" (toJson $v.adapters.s3.url)) }}
{{- end }}
{{- else }}
{{- include "tsubasa.assertOneOf" (list "adapters.pvc.accessMode" $v.adapters.pvc.accessMode (list "ReadWriteMany" "ReadWriteOnce" "ReadWriteOncePod")) }}
{{- end }}
{{/* serving */}}
{{- $rs := $v.rayService }}
{{- if $rs.enabled }}
{{- include "tsubasa.assertMap" (list "rayService.args" $rs.args) }}
{{- include "tsubasa.assertList" (list "rayService.deployments" $rs.deployments) }}
{{- include "tsubasa.assertOneOf" (list "rayService.upgradeStrategy" $rs.upgradeStrategy (list "NewCluster" "None")) }}
{{- include "tsubasa.assertOneOf" (list "rayService.autoscaler.upscalingMode" $rs.autoscaler.upscalingMode (list "Default" "Aggressive" "Conservative")) }}
{{- include "tsubasa.assertPlacement" (list "rayService.head" $rs.head) }}
{{- range $name := list "cpuWorkers" "gpuWorkers" }}
{{- $g := get $rs $name }}
{{- if $g.enabled }}
{{- include "tsubasa.assertPlacement" (list (printf "rayService.%s" $name) $g) }}
{{- include "tsubasa.assertReplicas" (list (printf "rayService.%s" $name) $g) }}
{{- end }}
{{- end }}
{{- if $rs.gpuWorkers.enabled }}
{{- include "tsubasa.assertPositiveInt" (list "rayService.gpuWorkers.gpus" $rs.gpuWorkers.gpus 1) }}
{{- /* One GPU per LLM replica (services/serve/app.py): the group must hold the most replicas Serve asks for. */}}
{{- $sc := dict }}
{{- if and (kindIs "map" $v.config) (kindIs "map" $v.config.serve) }}{{ $sc = $v.config.serve }}{{ end }}
{{- $field := ternary "max_replicas" "llm_replicas" (eq (toString (get $sc "autoscaling")) "true") }}
{{- $want := int (get $sc $field | default (ternary 4 1 (eq $field "max_replicas"))) }}
{{- $room := mul (int $rs.gpuWorkers.maxReplicas) (int $rs.gpuWorkers.gpus) }}
{{- if gt $want $room }}
{{- fail (printf "values: config.serve.%s=%d LLM replicas need %d GPUs, but rayService.gpuWorkers holds at most maxReplicas x gpus = %d" $field $want $want $room) }}
{{- end }}
{{- end }}
{{- if and (kindIs "map" $v.config) (kindIs "map" $v.config.model) }}
{{- if and (eq (toString $v.config.model.engine) "vllm") (not $rs.gpuWorkers.enabled) }}
{{- fail "values: config.model.engine=vllm needs rayService.gpuWorkers.enabled=true (or use engine hf on CPU)" }}
{{- end }}
{{- end }}
{{- end }}
{{/* ingestion */}}
{{- if $v.ingest.enabled }}
{{- include "tsubasa.assertPlacement" (list "ingest" $v.ingest) }}
{{- if hasKey $v.ingest "replicas" }}
{{- fail "values: ingest.replicas is not a setting: one ingest service owns the topic's partitions; scale with config.kafka.consumers / config.kafka.writers and ingest.resources" }}
{{- end }}
{{- include "tsubasa.assertPositiveInt" (list "ingest.gpus" $v.ingest.gpus 0) }}
{{- include "tsubasa.assertList" (list "ingest.command" $v.ingest.command) }}
{{- include "tsubasa.assertList" (list "ingest.args" $v.ingest.args) }}
{{- include "tsubasa.assertList" (list "ingest.env" $v.ingest.env) }}
{{- end }}
{{/* distillation */}}
{{- $d := $v.distill }}
{{- if $d.enabled }}
{{- include "tsubasa.assertOneOf" (list "distill.scheduler" $d.scheduler (list "cronjob" "raycronjob")) }}
{{- if not $d.schedule }}
{{- fail "values: distill.schedule is required when distill.enabled (cron syntax, e.g. \"0 3 * * *\")" }}
{{- end }}
{{- if ne (len (splitList " " (trim $d.schedule))) 5 }}
{{- if not (hasPrefix "@" $d.schedule) }}
{{- fail (printf "values: distill.schedule must have 5 cron fields or be a @macro, got %s" (toJson $d.schedule)) }}
{{- end }}
{{- end }}
{{- include "tsubasa.assertList" (list "distill.tenants" $d.tenants) }}
{{- include "tsubasa.assertMap" (list "distill.job" $d.job) }}
{{- if and (eq $d.scheduler "raycronjob") (not $d.tenants) }}
{{- fail "values: distill.scheduler=raycronjob needs distill.tenants (the cronjob scheduler can instead distil every tenant in the API keys Secret)" }}
{{- end }}
{{- include "tsubasa.assertList" (list "distill.command" $d.command) }}
{{- include "tsubasa.assertList" (list "distill.args" $d.args) }}
{{- range $t := $d.tenants }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$" (toString $t)) }}
{{- fail (printf "values: distill.tenants entry %s is not a valid tenant id" (toJson $t)) }}
{{- end }}
{{- end }}
{{- include "tsubasa.assertPlacement" (list "distill.head" $d.head) }}
{{- include "tsubasa.assertPlacement" (list "distill.workers" $d.workers) }}
{{- include "tsubasa.assertPositiveInt" (list "distill.workers.gpus" $d.workers.gpus 0) }}
{{- include "tsubasa.assertPositiveInt" (list "distill.workers.replicas" $d.workers.replicas 1) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Ray pods */}}

{{/* A Ray pod template (head or worker).
     (dict "ctx" $ "component" "ray-head" "image" img "group" groupValues "resources" yamlString
           "ports" list "shmSize" "" "serviceAccount" bool) */}}
{{- define "tsubasa.rayPodTemplate" -}}
{{- $ := .ctx -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "tsubasa.componentLabels" (dict "ctx" $ "component" .component) | nindent 4 }}
    tsubasa.ai/ray-metrics: "true"
  annotations:
    checksum/config: {{ include "tsubasa.configDocument" $ | sha256sum }}
spec:
  {{- if .serviceAccount }}
  serviceAccountName: {{ include "tsubasa.serviceAccountName" $ }}
  {{- end }}
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray
      image: {{ .image }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $.Values.securityContext | nindent 8 }}
      env:
        {{- include "tsubasa.env" $ | nindent 8 }}
      {{- with $.Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      resources:
        {{- .resources | nindent 8 }}
      volumeMounts:
        {{- include "tsubasa.volumeMounts" (dict "ctx" $ "shmSize" .shmSize) | nindent 8 }}
  volumes:
    {{- include "tsubasa.volumes" (dict "ctx" $ "shmSize" .shmSize) | nindent 4 }}
{{- end }}

{{- define "tsubasa.rayHeadPorts" -}}
- {name: gcs, containerPort: 6379}
- {name: dashboard, containerPort: 8265}
- {name: client, containerPort: 10001}
- {name: serve, containerPort: 8000}
- {name: metrics, containerPort: 8080}
{{- end }}

{{- define "tsubasa.rayWorkerPorts" -}}
- {name: serve, containerPort: 8000}
- {name: metrics, containerPort: 8080}
{{- end }}

{{/* ---------------------------------------------------------------- distillation */}}

{{/* Shell words joined for a Ray job entrypoint; words with shell-special characters are quoted. */}}
{{- define "tsubasa.shellJoin" -}}
{{- $words := list }}
{{- range . }}
{{- $w := toString . }}
{{- if contains "'" $w }}
{{- fail (printf "values: distill.command/args entry %s contains a single quote" (toJson $w)) }}
{{- end }}
{{- if regexMatch "^[A-Za-z0-9_./=:@,+-]+$" $w }}
{{- $words = append $words $w }}
{{- else }}
{{- $words = append $words (squote $w) }}
{{- end }}
{{- end }}
{{- join " " $words }}
{{- end }}

{{/* One distillation run's entrypoint: (dict "ctx" $ "tenant" "acme"|"") ; an empty tenant leaves
     the `{tenant}` placeholder the launcher fills for every tenant in the API keys Secret. */}}
{{- define "tsubasa.distillEntrypoint" -}}
{{- $d := .ctx.Values.distill }}
{{- /* Tenant ids are validated identifiers (no shell-special characters): never quoted. */}}
{{- include "tsubasa.shellJoin" $d.command }} --tenant {{ default "{tenant}" .tenant }} {{ include "tsubasa.shellJoin" (concat (list "--all-new" "--job-config" "/etc/tsubasa/distill-job.yaml") $d.args) }}
{{- end }}

{{/* The distillation job file (services/train/config.py: `settings` + `job`): distill.job with
     Ray Train's size taken from distill.workers. Settings come from TSUBASA_CONFIG, not from here. */}}
{{- define "tsubasa.distillJobDocument" -}}
{{- $w := .Values.distill.workers }}
{{- $job := deepCopy (default dict .Values.distill.job) }}
{{- /* Ray Train checkpoints must be reachable from every pod of the run: S3 next to the adapters. */}}
{{- if and (eq .Values.adapters.storage "s3") (not (hasKey $job "storage_path")) (not .Values.distill.workDir) }}
{{- $_ := set $job "storage_path" (printf "%s/.distill/checkpoints" (.Values.adapters.s3.url | trimSuffix "/")) }}
{{- end }}
{{- if gt (int $w.gpus) 0 }}
{{- $job = mergeOverwrite $job (dict "num_workers" (mul (int $w.replicas) (int $w.gpus)) "use_gpu" true "gpus_per_worker" 1) }}
{{- else }}
{{- $job = mergeOverwrite $job (dict "num_workers" (int $w.replicas) "use_gpu" false) }}
{{- end }}
{{- toYaml (dict "settings" dict "job" $job) }}
{{- end }}

{{/* Work directory of distillation (QA / teacher-target caches, by `tsubasa distill`; local paths
     only): the adapters PVC when there is one (shared, so caches survive between runs), else the
     pod's own data volume (caches are recomputed per run). Hidden from the registry by its dot. */}}
{{- define "tsubasa.distillWorkDir" -}}
{{- if .Values.distill.workDir }}
{{- .Values.distill.workDir }}
{{- else if eq .Values.adapters.storage "pvc" }}
{{- printf "%s/.distill" (.Values.adapters.pvc.mountPath | trimSuffix "/") }}
{{- else }}
{{- print "/var/lib/tsubasa/distill" }}
{{- end }}
{{- end }}

{{/* Label value identifying one scheduled job (tenant ids may hold characters labels refuse). */}}
{{- define "tsubasa.distillJobKey" -}}
{{- if . }}{{ sha256sum . | trunc 16 }}{{ else }}per-api-key-tenant{{ end }}
{{- end }}

{{/* RayJob spec of one distillation run: (dict "ctx" $ "tenant" "acme"|"") */}}
{{- define "tsubasa.distillRayJobSpec" -}}
{{- $ := .ctx }}
{{- $d := $.Values.distill }}
entrypoint: {{ include "tsubasa.distillEntrypoint" . | quote }}
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ int $d.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ int $d.activeDeadlineSeconds }}
backoffLimit: {{ int $d.backoffLimit }}
rayClusterSpec:
  rayVersion: {{ $.Values.ray.version | quote }}
  {{- with $.Values.ray.authOptions }}
  authOptions:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  headGroupSpec:
    rayStartParams:
      {{- include "tsubasa.rayStartParams" $d.head.rayStartParams | nindent 6 }}
    template:
      {{- include "tsubasa.rayPodTemplate" (dict "ctx" $ "component" "distill-head" "image" (include "tsubasa.image" $) "group" $d.head "resources" (toYaml $d.head.resources) "ports" (include "tsubasa.rayHeadPorts" $ | fromYamlArray) "shmSize" "" "serviceAccount" true) | nindent 6 }}
  workerGroupSpecs:
    {{- $w := $d.workers }}
    {{- $gpu := gt (int $w.gpus) 0 }}
    - groupName: {{ ternary "gpu" "cpu" $gpu }}
      replicas: {{ int $w.replicas }}
      minReplicas: {{ int $w.replicas }}
      maxReplicas: {{ int $w.replicas }}
      rayStartParams:
        {{- include "tsubasa.rayStartParams" $w.rayStartParams | nindent 8 }}
      template:
        {{- $res := ternary (include "tsubasa.gpuResources" (dict "resources" $w.resources "gpus" $w.gpus "name" $w.gpuResourceName)) (toYaml $w.resources) $gpu }}
        {{- $img := ternary (include "tsubasa.gpuImage" $) (include "tsubasa.image" $) $gpu }}
        {{- include "tsubasa.rayPodTemplate" (dict "ctx" $ "component" "distill-worker" "image" $img "group" $w "resources" $res "ports" (include "tsubasa.rayWorkerPorts" $ | fromYamlArray) "shmSize" $w.shmSize "serviceAccount" true) | nindent 8 }}
{{- end }}

{{/* What one scheduled run creates: a RayJob template and one entrypoint per tenant (the
     launcher fills each copy in), so the ConfigMap stays small with many tenants. */}}
{{- define "tsubasa.distillRun" -}}
{{- $ := . }}
{{- $tenants := .Values.distill.tenants }}
{{- if not $tenants }}{{ $tenants = list "" }}{{ end }}
template:
  apiVersion: ray.io/v1
  kind: RayJob
  metadata:
    generateName: {{ include "tsubasa.fullname" $ | trunc 24 | trimSuffix "-" }}-distill-
    labels:
      {{- include "tsubasa.componentLabels" (dict "ctx" $ "component" "distill") | nindent 6 }}
  spec:
    {{- include "tsubasa.distillRayJobSpec" (dict "ctx" $ "tenant" "") | nindent 4 }}
runs:
{{- range $tenants }}
  - key: {{ include "tsubasa.distillJobKey" . }}
    tenant: {{ default "*" . | quote }}
    entrypoint: {{ include "tsubasa.distillEntrypoint" (dict "ctx" $ "tenant" .) | quote }}
{{- end }}
{{- end }}
