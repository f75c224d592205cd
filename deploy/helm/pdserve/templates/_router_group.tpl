{{/* More routers behind the Service (router.replicas > 1): a `router` worker group of the
     RayCluster, router.replicas - 1 pods. Each pod joins the Ray cluster as a node that
     offers nothing to schedule on (num-cpus 0, no pdserve resource), then runs
     `pdserve router` as a Ray driver of that node: it finds the pools the head's router
     created by name (the `pdserve-directory` actor), subscribes to every worker's pushed KV
     events, and routes on its own prefix index and load view. The head's router creates the
     workers (detached actors); any router may replace a dead one (the one elected through
     the directory), and the pool outlives any one router. */}}
{{- define "pdserve.routerGroup" -}}
{{- $root := . }}
{{- $r := .Values.router }}
{{- $certDir := "/etc/pdserve/tls" }}
- groupName: router
  replicas: {{ sub (int $r.replicas) 1 }}
  minReplicas: {{ sub (int $r.replicas) 1 }}
  maxReplicas: {{ sub (int $r.replicas) 1 }}
  rayStartParams:
    num-cpus: "0"
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: router
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      terminationGracePeriodSeconds: {{ $r.terminationGracePeriodSeconds }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.pod.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.pod.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.pod.affinity }}
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
          # KubeRay's `ray start` in the background; once this node is up, the router as
          # the container's main process (SIGTERM drains it; a crash restarts the pod).
          args:
            - |
              ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
              log="${TMPDIR:-/tmp}/ray-start.log"
              eval "$KUBERAY_GEN_RAY_START_CMD" >"$log" 2>&1 &
              until grep -q "Ray runtime started" "$log"; do
                kill -0 $! 2>/dev/null || { cat "$log" >&2; echo "ray start failed" >&2; exit 1; }
                sleep 1
              done
              address=$(printf '%s\n' "$KUBERAY_GEN_RAY_START_CMD" | sed -n 's/.*--address=\([^ ]*\).*/\1/p')
              exec pdserve router --ray-address "$address" --wait 900 \
                --host 0.0.0.0 --port {{ $r.grpcPort }} --http-port {{ $r.httpPort }} \
                --metrics-port {{ $r.metricsPort }} --balancer {{ $r.balancer }} \
                {{- if .Values.tls.enabled }}
                --tls-cert {{ $certDir }}/tls.crt --tls-key {{ $certDir }}/tls.key \
                {{- end }}
                -v
          {{- if or .Values.apiKey.enabled $r.env }}
          env:
            {{- if .Values.apiKey.enabled }}
            - name: PDSERVE_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.apiKey.secretName }}
                  key: {{ .Values.apiKey.secretKey }}
            {{- end }}
            {{- with $r.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $r.grpcPort }}
            - name: http
              containerPort: {{ $r.httpPort }}
            - name: metrics
              containerPort: {{ $r.metricsPort }}
          {{- range $kind := list "startupProbe" "readinessProbe" "livenessProbe" }}
          {{ $kind }}:
            {{- if eq $r.probe "grpc" }}
            grpc:
              port: {{ $r.grpcPort }}
            {{- else }}
            httpGet:
              path: {{ ternary "/metrics" "/health" (eq $kind "livenessProbe") }}
              port: metrics
            {{- end }}
            periodSeconds: {{ (index $r $kind).periodSeconds }}
            failureThreshold: {{ (index $r $kind).failureThreshold }}
          {{- end }}
          lifecycle:
            preStop:
              exec:
                command:
                  - /bin/sh
                  - -c
                  - sleep {{ $r.preStopDelaySeconds }}; kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done
          resources:
            {{- toYaml $r.pod.resources | nindent 12 }}
          volumeMounts:
            {{- include "pdserve.scratchMounts" $root | trim | nindent 12 }}
            {{- if .Values.tls.enabled }}
            - name: tls
              mountPath: {{ $certDir }}
              readOnly: true
            {{- end }}
            {{- with (include "pdserve.modelMounts" $root) }}{{- . | trim | nindent 12 }}{{- end }}
      volumes:
        {{- include "pdserve.scratchVolumes" $root | trim | nindent 8 }}
        {{- if .Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ .Values.tls.secretName }}
        {{- end }}
        {{- with (include "pdserve.modelVolumes" $root) }}{{- . | trim | nindent 8 }}{{- end }}
{{- end }}
