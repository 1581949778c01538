{{/*
The DaemonSet that removes iamlet from every node: each pod waits until no agent answers on
the agent's port on its node, runs `iamlet cleanup --kube2iam` once (iamlet's chain and jumps,
both backends, IPv4 and IPv6, and kube2iam's leftover DNAT rules), then idles so that
`kubectl rollout status` reports every node done. Same pod as deploy/manifests/uninstall.yaml.
Arguments: dict "root" (the chart context), "name", "annotations".
*/}}
{{- define "iamlet.uninstallDaemonSet" -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "iamlet.labels" .root | nindent 4 }}
    app.kubernetes.io/component: uninstall
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  # Labels that never match the agent's selector.
  selector:
    matchLabels:
      app.kubernetes.io/name: {{ .name }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 100%
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {{ .name }}
        app.kubernetes.io/instance: {{ .root.Release.Name }}
    spec:
      {{- with .root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      hostNetwork: true
      automountServiceAccountToken: false
      {{- with .root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: 1
      initContainers:
        - name: wait-for-agent-gone
          image: {{ include "iamlet.image" .root | quote }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          env:
            - name: AGENT_PORT
              value: {{ .root.Values.host.port | quote }}
          command:
            - /bin/bash
            - -c
            - |
              while (exec 3<>"/dev/tcp/127.0.0.1/${AGENT_PORT}") 2>/dev/null; do
                echo "an agent still answers on port ${AGENT_PORT} of this node; waiting (delete the iamlet/kube2iam DaemonSet first)"
                sleep 10
              done
              echo "nothing listens on port ${AGENT_PORT}: cleaning up"
          resources:
            requests: {cpu: 5m, memory: 8Mi}
            limits: {memory: 32Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
        - name: cleanup
          image: {{ include "iamlet.image" .root | quote }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          command: ["iamlet", "cleanup", "--kube2iam"]
          resources:
            requests: {cpu: 5m, memory: 16Mi}
            limits: {memory: 64Mi}
          {{- with .root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: xtables-lock
              mountPath: /run/xtables.lock
      containers:
        - name: done
          image: {{ include "iamlet.image" .root | quote }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          command: ["/bin/sleep", "infinity"]
          resources:
            requests: {cpu: 1m, memory: 4Mi}
            limits: {memory: 16Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
      volumes:
        - name: xtables-lock
          hostPath:
            path: /run/xtables.lock
            type: FileOrCreate
      {{- with .root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
