{{/* Names and labels. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else if contains (include "pdserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The router's pods: the Ray head of this release's RayCluster (labels KubeRay sets). */}}
{{- define "pdserve.routerSelector" -}}
ray.io/cluster: {{ include "pdserve.fullname" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* pdserve workers of a role: replicas x (GPUs per pod, or workersPerPod on CPU). */}}
{{- define "pdserve.perPod" -}}
{{- if gt (int .gpusPerPod) 0 }}{{ .gpusPerPod }}{{ else }}{{ .workersPerPod | default 1 }}{{ end }}
{{- end }}

{{- define "pdserve.device" -}}
{{- $p := int .Values.prefill.gpusPerPod }}
{{- $d := int .Values.decode.gpusPerPod }}
{{- if and (gt $p 0) (gt $d 0) }}cuda
{{- else if and (eq $p 0) (eq $d 0) }}cpu
{{- else }}
{{- fail "prefill.gpusPerPod and decode.gpusPerPod must be both 0 (CPU) or both > 0 (GPU): pdserve runs both pools on one device kind" }}
{{- end }}
{{- end }}

{{/* Checks that need more than one value (values.schema.json checks the rest). */}}
{{- define "pdserve.validate" -}}
{{- if and .Values.tls.enabled (eq .Values.router.probe "grpc") }}
{{- fail "router.probe=grpc cannot be used with tls.enabled: Kubernetes' gRPC probes speak plaintext; use router.probe=http" }}
{{- end }}
{{- if and (ne .Values.model.source "builtin") (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.mountPath)) .Values.model.path)) }}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s) when model.source is %s" .Values.model.path .Values.model.mountPath .Values.model.source) }}
{{- end }}
{{- if and (eq .Values.model.source "builtin") (not (has .Values.model.path (list "smollm2" "tiny" "small"))) }}
{{- fail (printf "model.source=builtin takes model.path smollm2, tiny or small, not %q; set model.source to pvc, hostPath or url for a checkpoint" .Values.model.path) }}
{{- end }}
{{- range $role := list "prefill" "decode" }}
{{- $g := index $.Values $role }}
{{- if and $.Values.autoscaling.enabled (or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "%s.replicas (%d) must lie within %s.minReplicas (%d) and %s.maxReplicas (%d) when autoscaling is enabled" $role (int $g.replicas) $role (int $g.minReplicas) $role (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Writable scratch of every container (the root filesystem may be read-only): /dev/shm for
     Ray's object store, /tmp for Ray's sockets, logs and spill, $HOME (/home/ray) for caches,
     and the built-in models' cache under it (an emptyDir, or model.cache.claimName). */}}
{{- define "pdserve.scratchMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/ray
{{- if eq .Values.model.source "builtin" }}
- name: model-cache
  mountPath: /home/ray/.cache/pdserve
{{- end }}
{{- end }}

{{- define "pdserve.scratchVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if eq .Values.model.source "builtin" }}
- name: model-cache
  {{- if .Values.model.cache.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.cache.claimName }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.cache.sizeLimit }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The model volume, its mount and (for model.source=url) the init container that fills it. */}}
{{- define "pdserve.modelVolumes" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type | default "Directory" }}
{{- else if eq $m.source "url" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.url.sizeLimit }}
{{- end }}
{{- end }}

{{- define "pdserve.modelMounts" -}}
{{- $m := .Values.model }}
{{- if ne $m.source "builtin" }}
- name: model
  mountPath: {{ $m.mountPath }}
  {{- if and (eq $m.source "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
  {{- end }}
  readOnly: {{ ne $m.source "url" }}
{{- end }}
{{- end }}

{{- define "pdserve.modelInit" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "url" }}
- name: fetch-model
  image: {{ $m.url.image }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $m.url.command }}
  command: {{- toYaml $m.url.command | nindent 4 }}
  {{- else }}
  command: ["/bin/sh", "-c", "aws s3 cp --recursive \"$MODEL_URL\" \"$MODEL_DIR\""]
  {{- end }}
  env:
    - name: MODEL_URL
      value: {{ $m.url.uri | quote }}
    - name: MODEL_DIR
      value: {{ $m.path | quote }}
    - name: HOME  # the copy tool's own files, on the writable /tmp
      value: /tmp
    {{- with $m.url.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.url.envFrom }}
  envFrom: {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* A worker group of the RayCluster: role is "prefill" or "decode". */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $g := index $root.Values $role }}
{{- $perPod := include "pdserve.perPod" $g }}
- groupName: {{ $role }}
  replicas: {{ $g.replicas }}
  {{- if $root.Values.autoscaling.enabled }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- else }}
  minReplicas: {{ $g.replicas }}
  maxReplicas: {{ $g.replicas }}
  {{- end }}
  rayStartParams:
    # The Ray resource that pins this role's pdserve workers to this group's pods.
    resources: {{ printf "\"{\\\"pdserve_%s\\\": %s}\"" $role $perPod | squote }}
    {{- with $g.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "pdserve.modelInit" $root) }}
      initContainers:
        {{- . | trim | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          command: ["/bin/bash", "-c", "--"]
          # KubeRay's own `ray start` (with this group's rayStartParams), as it would run it.
          args: ["ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; eval \"exec $KUBERAY_GEN_RAY_START_CMD\""]
          {{- with $g.extraEnv }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          lifecycle:
            preStop:
              exec:
                command: ["/bin/sh", "-c", "ray stop"]
          resources:
            {{- $res := deepCopy ($g.resources | default dict) }}
            {{- if gt (int $g.gpusPerPod) 0 }}
            {{- $limits := merge (dict $root.Values.gpuResourceName (int $g.gpusPerPod)) ($res.limits | default dict) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "pdserve.scratchMounts" $root | trim | nindent 12 }}
            {{- with (include "pdserve.modelMounts" $root) }}{{- . | trim | nindent 12 }}{{- end }}
      volumes:
        {{- include "pdserve.scratchVolumes" $root | trim | nindent 8 }}
        {{- with (include "pdserve.modelVolumes" $root) }}{{- . | trim | nindent 8 }}{{- end }}
{{- end }}
