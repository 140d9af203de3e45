{{/* Names, labels, and the checks that fail `helm template` with the value to fix. */}}

{{- define "baton.fullname" -}}
{{- if contains "baton" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-baton" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "baton.labels" -}}
app.kubernetes.io/name: baton
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "baton.selector" -}}
app.kubernetes.io/name: baton
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "baton.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "baton.headService" -}}
{{- printf "%s-head-svc" (include "baton.fullname" .) -}}
{{- end -}}

{{- define "baton.redisHost" -}}
{{- printf "%s-redis" (include "baton.fullname" .) -}}
{{- end -}}

{{- define "baton.tokenSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "baton.fullname" .)) -}}
{{- end -}}

{{- define "baton.redisSecret" -}}
{{- if .Values.redis.external.url -}}
{{- printf "%s-redis" (include "baton.fullname" .) -}}
{{- else if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "baton.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{- define "baton.redisExternal" -}}
{{- if or .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end -}}
{{- end -}}

{{/* BATON_REDIS_URL (and what it is made of) for a container. */}}
{{- define "baton.redisEnv" -}}
{{- if include "baton.redisExternal" . -}}
- name: BATON_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "baton.redisSecret" . }}
      key: {{ ternary "redis-url" .Values.redis.external.existingSecretKey (ne .Values.redis.external.url "") }}
{{- else -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "baton.redisSecret" . }}
      key: {{ ternary .Values.redis.existingSecretKey "redis-password" (ne .Values.redis.existingSecret "") }}
- name: BATON_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "baton.redisHost" .) | quote }}
{{- end }}
{{- end -}}

{{- define "baton.tokenEnv" -}}
- name: BATON_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "baton.tokenSecret" . }}
      key: {{ ternary .Values.auth.existingSecretKey "api-token" (ne .Values.auth.existingSecret "") }}
{{- end -}}

{{/* A pool's GPUs per Ray worker pod: its num_gpus rounded up (pods hold whole GPUs). */}}
{{- define "baton.poolGpus" -}}
{{- int (ceil (.num_gpus | default 0)) -}}
{{- end -}}

{{/* Every check the schema cannot make, with the value to fix in the message. */}}
{{- define "baton.validate" -}}
{{- $c := .Values.cluster -}}
{{- if not $c.pools -}}
{{- fail "cluster.pools: no pools; give at least one pool with role decode or both" -}}
{{- end -}}
{{- $serving := 0 -}}
{{- $names := list -}}
{{- range $i, $p := $c.pools -}}
{{- $replicas := hasKey $p "replicas" | ternary $p.replicas 1 -}}
{{- if and (has $p.role (list "decode" "both")) (gt (int $replicas) 0) -}}
{{- $serving = add1 $serving -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$" (toString $p.name)) -}}
{{- fail (printf "cluster.pools[%d].name %q: a pool name names its Ray worker group and pods; use lowercase letters, digits and '-' (at most 40)" $i (toString $p.name)) -}}
{{- end -}}
{{- if has $p.name $names -}}
{{- fail (printf "cluster.pools[%d].name %q: another pool has that name" $i $p.name) -}}
{{- end -}}
{{- $names = append $names $p.name -}}
{{- $gpus := int (include "baton.poolGpus" $p) -}}
{{- if and (eq (toString $p.device) "cuda") (not $gpus) -}}
{{- fail (printf "cluster.pools[%d].num_gpus: pool %q has device cuda, so it needs num_gpus > 0" $i $p.name) -}}
{{- end -}}
{{- if $p.cpu_cores -}}
{{- fail (printf "cluster.pools[%d].cpu_cores: pins the cores of one machine (baton up); leave it out on Kubernetes, where num_cpus sizes each pod" $i) -}}
{{- end -}}
{{- $place := index $.Values.poolPlacement $p.name | default dict -}}
{{- if and $gpus $p.accelerator_type (not $place.nodeSelector) (not (hasKey $.Values.gpuNodes.products $p.accelerator_type)) -}}
{{- fail (printf "cluster.pools[%d].accelerator_type %q: no node label for it in gpuNodes.products; add it there or set poolPlacement.%s.nodeSelector" $i $p.accelerator_type $p.name) -}}
{{- end -}}
{{- end -}}
{{- if eq $serving 0 -}}
{{- fail "cluster.pools: no pool with role decode or both has replicas; the router needs a decode pool" -}}
{{- end -}}
{{- range $name, $_ := .Values.poolPlacement -}}
{{- if not (has $name $names) -}}
{{- fail (printf "poolPlacement.%s: no pool of that name in cluster.pools (%s)" $name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- if and $c.redis $c.redis.url -}}
{{- fail "cluster.redis.url: leave it unset in the chart; give redis.external.url (kept in a Secret) instead" -}}
{{- end -}}
{{- end -}}

{{/* Mounts and env every Baton container gets. */}}
{{- define "baton.configVolume" -}}
- name: baton-config
  configMap:
    name: {{ include "baton.fullname" . }}-config
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "baton.configMount" -}}
- name: baton-config
  mountPath: /etc/baton
  readOnly: true
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}
