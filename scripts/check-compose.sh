#!/usr/bin/env bash
# Offline validation of the docker compose stack (docker-compose.yml, Dockerfile,
# config/compose/, config/grafana/, and the `fleet` profile's deploy/fleet/): everything
# that can be checked without a Docker engine. It does not build the image nor start a
# container.
#
#   scripts/check-compose.sh target/debug/weir
#
# 1. `docker-compose config` accepts docker-compose.yml (Debian's docker-compose 1.29.2 is
#    installed when missing; a weir.env is copied from weir.env.example for the check
#    when there is none, and removed again), and so does `docker-compose --profile fleet
#    config`; checks 2 and 6 read the latter: the default services and the fleet ones;
# 2. every file the stack bind-mounts or builds from exists in the repo;
# 3. `weir check` accepts config/compose/weir.toml and every deploy/fleet/*.toml;
# 4. `promtool check config` accepts config/compose/prometheus.yml;
# 5. Grafana's provisioning files parse, and the dashboard uses the provisioned datasource;
# 6. every command given to a container of the weir image (compose `command`, the
#    Dockerfile's CMD and HEALTHCHECK) is one this weir binary accepts, and the stack's
#    addresses agree with each other (listeners, ports, scrape target, upstreams);
# 7. the fleet profile: its services start only with `--profile fleet` and no default
#    service needs them; no host port is published twice; each weir instance runs a
#    config weir check accepts, with a [fleet] section naming the profile's etcd service
#    (healthy before the instance starts), a distinct instance id, its own state volume,
#    its listeners published, and the default weir's services and pools.
#
# One line per check; the first failure stops it with a message and exit status 1.
# Needs root only to install missing Debian packages (docker-compose, prometheus).
set -euo pipefail

me=check-compose
fail() {
  printf '%s: FAIL: %s\n' "$me" "$*" >&2
  exit 1
}
ok() {
  printf '%s: ok: %s\n' "$me" "$*"
}

[ $# -eq 1 ] || {
  echo "usage: $0 WEIR_BIN   (e.g. $0 target/debug/weir)" >&2
  exit 2
}
# The weir binary, made absolute before the cd below.
case $1 in
*/*) weir_bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1") ;;
*) weir_bin=$(command -v "$1" || true) ;;
esac
if [ -z "$weir_bin" ] || [ ! -x "$weir_bin" ]; then
  fail "weir binary \`$1\` not found or not executable"
fi

cd "$(dirname "$0")/.."
root=$(pwd)
compose_file=docker-compose.yml
weir_config=config/compose/weir.toml
fleet_dir=deploy/fleet
prom_config=config/compose/prometheus.yml
[ -f "$compose_file" ] || fail "$compose_file not found in $root"
# `weir check` runs every check `weir run` does, the admin token included: give it the
# environment the container gets from its env_file (weir.env, made from the example).
WEIR_ADMIN_TOKEN=$(sed -n 's/^WEIR_ADMIN_TOKEN=//p' weir.env.example)
export WEIR_ADMIN_TOKEN

tmp=$(mktemp -d)
# Env files this script created for `docker-compose config`; removed on any exit.
created_env=()
cleanup() {
  local f
  for f in "${created_env[@]}"; do
    rm -f -- "$f"
  done
  rm -rf -- "$tmp"
}
trap cleanup EXIT

# Debian packages, installed quietly when missing; apt-get update only if needed.
apt_install() {
  [ "$(id -u)" -eq 0 ] || fail "$* missing; install Debian's $* (needs root)"
  export DEBIAN_FRONTEND=noninteractive
  local log=$tmp/apt.log
  if ! apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >>"$log" 2>&1; then
      cat "$log" >&2
      fail "cannot install $*"
    fi
  fi
  ok "installed Debian package(s): $*"
}

# ---- 1. docker-compose config -----------------------------------------------------

command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
# The YAML is read with Debian's python3 and its yaml module (docker-compose's own
# dependency): the default python3 may be another one without it.
py=/usr/bin/python3
if ! { [ -x "$py" ] && "$py" -c 'import yaml, tomllib' >/dev/null 2>&1; }; then
  apt_install python3 python3-yaml
  "$py" -c 'import yaml, tomllib' >/dev/null 2>&1 || fail "$py cannot import yaml and tomllib"
fi

# The Python half: parsing and cross-checks. Subcommands below; each prints its own
# ok/FAIL lines and exits 1 on the first failure.
read -r -d '' pyprog <<'PYEOF' || true
import fnmatch, json, os, re, shlex, subprocess, sys, tomllib
import yaml

ME = "check-compose"
ROOT = os.getcwd()


def ok(msg):
    print(f"{ME}: ok: {msg}", flush=True)


def fail(msg):
    print(f"{ME}: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def load_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        fail(f"{rel(path)} is not valid YAML: {e}")


def rel(path):
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def in_repo(path):
    path = os.path.realpath(path)
    return path == ROOT or path.startswith(ROOT + os.sep)


# ---- docker-compose.yml and `docker-compose config` output ----

def raw_compose(path):
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        fail(f"{path}: no `services` mapping")
    return data


def env_files(service):
    """env_file entries of a raw service, as paths (short or long syntax)."""
    v = service.get("env_file") or []
    if isinstance(v, (str, dict)):
        v = [v]
    return [e["path"] if isinstance(e, dict) else e for e in v]


def volumes(service):
    """(type, source, target) for every volume of a service in `config` output."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):  # Compose v2 long syntax
            out.append((v.get("type"), v.get("source"), v.get("target")))
            continue
        parts = v.split(":")
        if len(parts) == 1:
            out.append(("volume", None, parts[0]))
            continue
        src, tgt = parts[0], parts[1]
        kind = "bind" if src.startswith(("/", ".", "~")) else "volume"
        out.append((kind, src, tgt))
    return out


def container_ports(service):
    ports = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def command_args(service, default):
    cmd = service.get("command")
    if cmd is None:
        return list(default)
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def host_path(service, container_path, what):
    """The repo file that a service's bind mounts show at container_path."""
    best = None
    for kind, src, tgt in volumes(service):
        if kind != "bind" or not tgt:
            continue
        t = tgt.rstrip("/")
        if container_path == t or container_path.startswith(t + "/"):
            if best is None or len(t) > len(best[1]):
                best = (src, t)
    if best is None:
        fail(f"{what}: {container_path} is not inside any bind mount of the service")
    src, t = best
    path = os.path.normpath(src + container_path[len(t):])
    if not in_repo(path):
        fail(f"{what}: {container_path} maps to {path}, outside the repo")
    if not os.path.isfile(path):
        fail(f"{what}: {container_path} maps to {rel(path)}, which does not exist")
    return path


# ---- Dockerfile ----

def dockerfile_stages(path):
    """[(base, [(INSTRUCTION, rest)])] per stage; continuation lines joined."""
    stages, logical, cur = [], [], ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.rstrip("\n")
            if not cur and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if cur and s.lstrip().startswith("#"):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            logical.append(cur + s)
            cur = ""
    if cur:
        logical.append(cur)
    for l in logical:
        word, _, rest = l.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append((rest.split()[0], []))
        elif stages:
            stages[-1][1].append((word, rest.strip()))
    if not stages:
        fail(f"{rel(path)}: no FROM")
    return stages


def exec_form(what, text):
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        fail(f"{what} must use the exec (JSON array) form, got `{text}`")
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        fail(f"{what} must be a non-empty JSON array of strings, got `{text}`")
    return v


def runtime_instructions(path):
    stages = dockerfile_stages(path)
    found = {}
    for word, rest in stages[-1][1]:
        found.setdefault(word, []).append(rest)
    return stages, found


# ---- weir's config ----

def load_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"{rel(path)}: {e}")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def host_of(addr):
    return addr.rsplit(":", 1)[0].strip("[]")


# ---- the weir image and its services ----

class Stack:
    def __init__(self, compose, config_out):
        self.compose = compose
        self.raw = raw_compose(compose)
        self.cfg = load_yaml(config_out)
        self.services = self.cfg.get("services") or {}
        builders = {n: s for n, s in self.services.items() if s.get("build")}
        if len(builders) != 1:
            fail(f"expected exactly one service that builds the weir image, found {sorted(builders)}")
        (self.weir_name, self.weir), = builders.items()
        b = self.weir["build"]
        ctx = b if isinstance(b, str) else b.get("context", ".")
        self.context = ctx if os.path.isabs(ctx) else os.path.join(os.path.dirname(os.path.abspath(compose)), ctx)
        df = "Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile")
        self.dockerfile = df if os.path.isabs(df) else os.path.join(self.context, df)
        self.image = self.weir.get("image")
        # Services running the weir image: the builder and every service naming its tag.
        self.weir_services = {
            n: s for n, s in self.services.items()
            if n == self.weir_name or (self.image and s.get("image") == self.image)
        }

    def weir_config(self, default_cmd):
        """The repo path of the config the weir service runs with."""
        args = command_args(self.weir, default_cmd)
        if not args or args[0] != "run":
            fail(f"service `{self.weir_name}` does not run `weir run`: {args}")
        cfg = "config/weir.toml"
        for i, a in enumerate(args):
            if a in ("--config", "-c") and i + 1 < len(args):
                cfg = args[i + 1]
            elif a.startswith("--config="):
                cfg = a.split("=", 1)[1]
        return cfg, host_path(self.weir, cfg, f"service `{self.weir_name}` --config")


def run_weir(weir_bin, args):
    return subprocess.run([weir_bin, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_args(weir_bin, what, args):
    """clap checks every argument (flags and their values) before it prints help, so
    `weir ARGS --help` exits 0 only when ARGS are valid. Checked to hold for this very
    command line: an unknown flag before --help must fail."""
    r = run_weir(weir_bin, [*args, "--help"])
    if r.returncode != 0:
        out = r.stdout.strip().splitlines()
        fail(f"{what}: `weir {shlex.join(args)}` is refused by {weir_bin}: {out[0] if out else r.returncode}")
    bogus = run_weir(weir_bin, [*args, "--check-compose-no-such-flag", "--help"])
    if bogus.returncode == 0:
        fail(f"{what}: `weir {shlex.join(args)} --<bogus flag> --help` exits 0: --help does not prove the arguments valid here")
    ok(f"{what}: weir accepts `{shlex.join(args)}`")


# ---- subcommands ----

def cmd_env_files(compose):
    """Print the env files docker-compose.yml names, relative to its directory."""
    raw = raw_compose(compose)
    seen = []
    for name, s in raw["services"].items():
        for e in env_files(s or {}):
            if e not in seen:
                seen.append(e)
    for e in seen:
        print(e)


def cmd_files(compose, config_out):
    st = Stack(compose, config_out)
    # Bind mounts.
    for name, s in st.services.items():
        for kind, src, tgt in volumes(s):
            if kind != "bind":
                continue
            if not in_repo(src):
                fail(f"service `{name}` bind-mounts {src}, outside the repo")
            if not os.path.exists(src):
                fail(f"service `{name}` bind-mounts {rel(src)}, which does not exist")
            ok(f"service `{name}` mounts {rel(src)}{'/' if os.path.isdir(src) else ''} at {tgt}")
    # Env files: never committed; an example of each is.
    for name, s in st.raw["services"].items():
        for e in env_files(s or {}):
            example = os.path.join(os.path.dirname(os.path.abspath(compose)), e) + ".example"
            if not os.path.isfile(example):
                fail(f"service `{name}` reads env_file {e}, but {rel(example)} (its committed example) does not exist")
            ok(f"service `{name}` env_file {e} has its example {rel(example)}")
        env = (s or {}).get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [x.split("=", 1)[0] for x in env]
        if "WEIR_ADMIN_TOKEN" in keys:
            fail(f"service `{name}` sets WEIR_ADMIN_TOKEN in docker-compose.yml; it belongs in weir.env")
    # The build: Dockerfile, .dockerignore, and every COPY source in the context.
    if not os.path.isfile(st.dockerfile):
        fail(f"service `{st.weir_name}` builds from {rel(st.dockerfile)}, which does not exist")
    ok(f"service `{st.weir_name}` builds from {rel(st.dockerfile)} (context {rel(st.context) or '.'})")
    ignore_file = os.path.join(st.context, ".dockerignore")
    ignored = []
    if os.path.isfile(ignore_file):
        with open(ignore_file, encoding="utf-8") as f:
            ignored = [l.strip().strip("/") for l in f if l.strip() and not l.startswith(("#", "!"))]
    stages = dockerfile_stages(st.dockerfile)
    for _, instrs in stages:
        for word, rest in instrs:
            if word not in ("COPY", "ADD"):
                continue
            parts = [p for p in rest.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in rest.split()):
                continue
            for src in parts[:-1]:
                p = os.path.join(st.context, src)
                if not os.path.exists(p):
                    fail(f"Dockerfile: {word} {src}: not in the build context")
                top = os.path.normpath(src).split(os.sep)[0]
                for pat in ignored:
                    if fnmatch.fnmatch(os.path.normpath(src), pat) or fnmatch.fnmatch(top, pat):
                        fail(f"Dockerfile: {word} {src}: excluded by .dockerignore (`{pat}`)")
    ok("Dockerfile: every COPY source is in the build context and not excluded by .dockerignore")


def cmd_grafana(compose, config_out):
    st = Stack(compose, config_out)
    graf = [(n, s) for n, s in st.services.items() if "grafana" in str(s.get("image", ""))]
    if len(graf) != 1:
        fail(f"expected one grafana service, found {[n for n, _ in graf]}")
    gname, g = graf[0]
    prov = None
    for kind, src, tgt in volumes(g):
        if kind == "bind" and tgt.rstrip("/") == "/etc/grafana/provisioning":
            prov = src
    if prov is None or not os.path.isdir(prov):
        fail(f"service `{gname}` mounts no provisioning directory at /etc/grafana/provisioning")
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(prov) for f in fs if f.endswith((".yml", ".yaml"))
    )
    datasources, providers = [], []
    for f in files:
        doc = load_yaml(f)
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
            fail(f"{rel(f)}: not a Grafana provisioning file (apiVersion: 1)")
        datasources += doc.get("datasources") or []
        providers += doc.get("providers") or []
        ok(f"{rel(f)} parses")
    proms = [d for d in datasources if d.get("type") == "prometheus"]
    if len(proms) != 1 or not proms[0].get("uid"):
        fail("provisioning must define exactly one prometheus datasource with a fixed uid")
    ds = proms[0]
    uid = ds["uid"]
    m = re.match(r"^https?://([^:/]+):(\d+)", ds.get("url", ""))
    if not m or m.group(1) not in st.services:
        fail(f"datasource `{ds.get('name')}` url {ds.get('url')!r} does not name a compose service")
    ok(f"datasource `{ds.get('name')}` (uid {uid}) points at service `{m.group(1)}` port {m.group(2)}")
    # Dashboards: each provider's path must be where the dashboard JSON is mounted.
    if not providers:
        fail("provisioning defines no dashboard provider")
    dashboards = []
    for p in providers:
        path = ((p.get("options") or {}).get("path") or "").rstrip("/")
        if not path:
            fail(f"dashboard provider `{p.get('name')}` has no options.path")
        for kind, src, tgt in volumes(g):
            t = tgt.rstrip("/")
            if kind != "bind":
                continue
            if os.path.dirname(t) == path and os.path.isfile(src):
                dashboards.append(src)
            elif t == path and os.path.isdir(src):
                dashboards += [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".json")]
    if not dashboards:
        fail("no dashboard JSON is mounted where the dashboard provider loads from")
    for path in dashboards:
        check_dashboard(path, uid)


def check_dashboard(path, uid):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{rel(path)} is not valid JSON: {e}")
    text = json.dumps({k: v for k, v in d.items() if k != "__inputs"})
    if "${DS_" in text:
        fail(f"{rel(path)}: `${{DS_...}}` placeholders are filled in only by the import UI, never by provisioning")
    variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
    ds_vars = {n for n, v in variables.items() if v.get("type") == "datasource"}
    for n in ds_vars:
        v = variables[n]
        cur = (v.get("current") or {}).get("value")
        if v.get("query") != "prometheus" or cur != uid:
            fail(f"{rel(path)}: datasource variable `{n}` must list prometheus datasources and default to uid {uid}, has query {v.get('query')!r} current {cur!r}")
    refs = []

    def walk(x):
        if isinstance(x, dict):
            if "datasource" in x:
                refs.append(x["datasource"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk({k: v for k, v in d.items() if k not in ("__inputs", "__requires")})
    good = {uid} | {f"${n}" for n in ds_vars} | {f"${{{n}}}" for n in ds_vars}
    for r in refs:
        if r is None:
            continue  # the default datasource: the provisioned one is the default
        u = r.get("uid") if isinstance(r, dict) else r
        t = r.get("type") if isinstance(r, dict) else None
        if t == "grafana" or u in ("-- Grafana --", "grafana"):
            continue
        if u not in good:
            fail(f"{rel(path)}: datasource reference {r!r} is neither uid {uid} nor a datasource variable")
    panels = sum(1 for p in d.get("panels") or [] if p.get("type") != "row")
    ok(f"{rel(path)} parses; its {len(refs)} datasource references resolve to uid {uid} ({panels} panels)")


def cmd_commands(compose, config_out, weir_bin):
    st = Stack(compose, config_out)
    stages, instr = runtime_instructions(st.dockerfile)
    entry = exec_form("Dockerfile ENTRYPOINT", instr.get("ENTRYPOINT", ["[]"])[-1])
    if os.path.basename(entry[0]) != "weir" or len(entry) != 1:
        fail(f"Dockerfile ENTRYPOINT is {entry}, expected [\"weir\"]")
    copies = [r.split()[-1] for w, r in stages[-1][1] if w == "COPY"]
    if "/usr/local/bin/weir" not in copies:
        fail("Dockerfile: the runtime stage does not COPY the binary to /usr/local/bin/weir")
    ok("Dockerfile: ENTRYPOINT weir is /usr/local/bin/weir")
    default_cmd = exec_form("Dockerfile CMD", instr.get("CMD", ["[]"])[-1])
    # Compose commands of the services running the weir image.
    for name, s in sorted(st.weir_services.items()):
        if s.get("entrypoint") is not None:
            fail(f"service `{name}` overrides the entrypoint; only weir's own commands can be checked")
        args = command_args(s, default_cmd)
        check_args(weir_bin, f"service `{name}` command", args)
        hc = s.get("healthcheck") or {}
        test = hc.get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if test and not hc.get("disable") and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1:
            hargs = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
            if os.path.basename(hargs[0]) != "weir":
                fail(f"service `{name}` healthcheck runs {hargs[0]}, not weir")
            check_args(weir_bin, f"service `{name}` healthcheck", hargs[1:])
    # The Dockerfile's own commands.
    cfg_arg, cfg_path = st.weir_config(default_cmd)
    check_args(weir_bin, "Dockerfile CMD", default_cmd)
    dflt_cfg = default_cmd[default_cmd.index("--config") + 1] if "--config" in default_cmd else None
    if dflt_cfg:
        p = host_path(st.weir, dflt_cfg, "Dockerfile CMD --config (with the weir service's mounts)")
        r = run_weir(weir_bin, ["check", "--config", p])
        if r.returncode != 0:
            fail(f"Dockerfile CMD --config {dflt_cfg} = {rel(p)}: weir check failed:\n{r.stdout}")
        ok(f"Dockerfile CMD --config {dflt_cfg} is {rel(p)} under compose, and weir check passes")
    hc = instr.get("HEALTHCHECK")
    if not hc:
        fail("Dockerfile has no HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc[-1])
    if not m:
        fail(f"Dockerfile HEALTHCHECK must be `CMD [\"weir\", ...]`, got `{hc[-1]}`")
    hargs = exec_form("Dockerfile HEALTHCHECK", m.group(1))
    if os.path.basename(hargs[0]) != "weir":
        fail(f"Dockerfile HEALTHCHECK runs {hargs[0]}, not weir")
    check_args(weir_bin, "Dockerfile HEALTHCHECK", hargs[1:])
    # `run --config X`: X is a repo file weir accepts.
    r = run_weir(weir_bin, ["check", "--config", cfg_path])
    if r.returncode != 0:
        fail(f"service `{st.weir_name}` runs with {cfg_arg} = {rel(cfg_path)}, which weir check refuses:\n{r.stdout}")
    ok(f"service `{st.weir_name}` runs with --config {cfg_arg} = {rel(cfg_path)}: {r.stdout.strip()}")
    wiring(st, default_cmd, cfg_path, instr)


def flag(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def wiring(st, default_cmd, cfg_path, instr):
    """The addresses of the stack agree: what listens where, and who connects to it."""
    c = load_toml(cfg_path)
    proxy = (c.get("proxy") or {}).get("listen", "127.0.0.1:8080")
    admin = (c.get("admin") or {}).get("listen", "127.0.0.1:9901")
    for what, addr in (("proxy.listen", proxy), ("admin.listen", admin)):
        if host_of(addr) in ("127.0.0.1", "::1", "localhost"):
            fail(f"{rel(cfg_path)}: {what} {addr} is loopback: unreachable from other containers and published ports")
    published = container_ports(st.weir)
    for what, addr in (("proxy.listen", proxy), ("admin.listen", admin)):
        if port_of(addr) not in published:
            fail(f"service `{st.weir_name}` does not publish {what} port {port_of(addr)} (publishes {sorted(published)})")
    exposed = {int(p.split("/")[0]) for e in instr.get("EXPOSE", []) for p in e.split()}
    if {port_of(proxy), port_of(admin)} - exposed:
        fail(f"Dockerfile EXPOSE {sorted(exposed)} misses the proxy or admin port ({port_of(proxy)}, {port_of(admin)})")
    ok(f"weir listens on {proxy} (proxy) and {admin} (admin); both published and EXPOSEd")
    admin_url = f"http://127.0.0.1:{port_of(admin)}"
    for e in instr.get("HEALTHCHECK", []):
        m = re.search(r"--admin[\"', =]+([^\"',\s]+)", e)
        if m and m.group(1).rstrip("/") != admin_url:
            fail(f"Dockerfile HEALTHCHECK asks {m.group(1)}, but admin.listen is {admin}")
    if (c.get("admin") or {}).get("token_file") is None:
        env = st.weir.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [x.split("=", 1)[0] for x in env]
        if "WEIR_ADMIN_TOKEN" not in keys:
            fail(f"service `{st.weir_name}` gets no WEIR_ADMIN_TOKEN (env_file), and weir refuses an admin listener off loopback without one")
    ok(f"service `{st.weir_name}` gets WEIR_ADMIN_TOKEN from its env_file")
    # State dir on a volume.
    state = (c.get("state") or {}).get("dir", "var/weir")
    if not os.path.isabs(state):
        fail(f"{rel(cfg_path)}: state.dir {state!r} should be absolute, on the state volume")
    vols = [tgt.rstrip("/") for kind, _, tgt in volumes(st.weir) if kind == "volume"]
    if not any(state == t or state.startswith(t + "/") for t in vols):
        fail(f"{rel(cfg_path)}: state.dir {state} is not on a volume of service `{st.weir_name}` ({vols})")
    df_vols = " ".join(instr.get("VOLUME", []))
    if state not in df_vols:
        fail(f"Dockerfile VOLUME {df_vols} does not declare the state dir {state}")
    ok(f"state.dir {state} is on a named volume (and a Dockerfile VOLUME)")
    # Upstream endpoints: compose services that listen on that port.
    listens = {}
    for name, s in st.weir_services.items():
        args = command_args(s, default_cmd)
        if args and args[0] == "upstream":
            listens[name] = port_of(flag(args, "--listen") or "127.0.0.1:9001")
            if host_of(flag(args, "--listen") or "127.0.0.1") in ("127.0.0.1", "::1"):
                fail(f"service `{name}` upstream listens on loopback: weir cannot reach it")
    hosts = set()
    for svc in c.get("service") or []:
        hosts.update(h.lower() for h in svc.get("hosts") or [])
        for pool, p in (svc.get("pools") or {}).items():
            for ep in p.get("endpoints") or []:
                h, port = host_of(ep), port_of(ep)
                if listens.get(h) != port:
                    fail(f"{rel(cfg_path)}: service {svc.get('name')} pool {pool} endpoint {ep} is no `weir upstream` service of the stack listening on port {port}")
                ok(f"pool {svc.get('name')}/{pool} endpoint {ep} is service `{h}`")
    # Load generators aim at the proxy.
    for name, s in st.weir_services.items():
        args = command_args(s, default_cmd)
        if args and args[0] == "traffic":
            target, host = flag(args, "--target"), flag(args, "--host")
            if not target or host_of(target) != st.weir_name or port_of(target) != port_of(proxy):
                fail(f"service `{name}`: --target {target} is not {st.weir_name}:{port_of(proxy)} (the proxy)")
            if host is not None and host.lower() not in hosts and not any(not svc.get("hosts") for svc in c.get("service") or []):
                fail(f"service `{name}`: --host {host} matches no weir service's hosts {sorted(hosts)}")
            ok(f"service `{name}` sends its load to {target} with Host {host}")
    # Prometheus scrapes the admin listener.
    prom = [(n, s) for n, s in st.services.items() if "prometheus" in str(s.get("image", ""))]
    for name, s in prom:
        cfgp = host_path(s, "/etc/prometheus/prometheus.yml", f"service `{name}` config")
        pc = load_yaml(cfgp)
        targets = [
            (j.get("metrics_path", "/metrics"), t)
            for j in pc.get("scrape_configs") or []
            for sc in j.get("static_configs") or []
            for t in sc.get("targets") or []
        ]
        want = f"{st.weir_name}:{port_of(admin)}"
        if ("/metrics", want) not in targets:
            fail(f"{rel(cfgp)} does not scrape {want}/metrics (targets: {targets})")
        if (c.get("admin") or {}).get("metrics_auth") and "authorization" not in json.dumps(pc):
            fail(f"{rel(cfgp)}: admin.metrics_auth is on but the scrape has no authorization")
        ok(f"service `{name}` scrapes {want}/metrics ({rel(cfgp)})")


# ---- the fleet profile ----

FLEET_PROFILE = "fleet"


def profiles(service):
    return [str(p) for p in service.get("profiles") or []]


def depends(service):
    """{name: condition} of a service's depends_on (short or long syntax)."""
    d = service.get("depends_on") or {}
    if isinstance(d, list):
        return {n: "service_started" for n in d}
    return {n: (v or {}).get("condition", "service_started") for n, v in d.items()}


def host_ports(service):
    """(host ip, host port, container port) for every published port of a service."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):  # Compose v2 long syntax
            if p.get("published") is not None:
                out.append((p.get("host_ip") or "0.0.0.0", int(p["published"]), int(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("0.0.0.0", int(parts[0]), int(parts[1])))
    return out


def url_host_port(url):
    m = re.match(r"^https?://(\[[^\]]+\]|[^:/]+):(\d+)/?$", url)
    return (m.group(1).strip("[]"), int(m.group(2))) if m else (None, None)


def cmd_fleet(compose, config_default, config_fleet, weir_bin):
    st = Stack(compose, config_fleet)
    default_out = load_yaml(config_default).get("services") or {}
    gated = {n for n, s in st.services.items() if profiles(s)}
    fleet = {n for n, s in st.services.items() if FLEET_PROFILE in profiles(s)}
    if not fleet:
        fail(f"no service of {compose} is in the `{FLEET_PROFILE}` profile")
    # 1. Without --profile the stack is the same as before: the fleet services are
    # gated (Compose v1 lists them in `config` all the same, v2 leaves them out), and
    # no default service needs one of them.
    base = {n for n in st.services if n not in gated}
    base_default = {n for n in default_out if n not in gated}
    if base != base_default:
        fail(f"`--profile {FLEET_PROFILE}` changes the default services: {sorted(base_default)} vs {sorted(base)}")
    for n in sorted(base):
        wants = set(depends(st.services[n])) & gated
        if wants:
            fail(f"default service `{n}` depends on {sorted(wants)}, which only `--profile` starts")
    ok(f"profile `{FLEET_PROFILE}` adds {sorted(fleet)} to the default services {sorted(base)}, which need none of them")
    # 2. Host ports: one service per (address, port), across both profiles.
    seen = {}
    wild = ("0.0.0.0", "::", "")
    for n, s in sorted(st.services.items()):
        for ip, hp, cp in host_ports(s):
            for (oip, ohp), other in seen.items():
                if ohp == hp and (oip == ip or oip in wild or ip in wild):
                    fail(f"service `{n}` publishes host port {ip}:{hp}, already taken by `{other}` ({oip}:{ohp})")
            seen[(ip, hp)] = n
    ok(f"no host port is published twice ({len(seen)} in all)")
    # 3. Named volumes: a fleet service shares none with another service.
    owners = {}
    for n, s in st.services.items():
        for kind, src, tgt in volumes(s):
            if kind == "volume" and src:
                owners.setdefault(src, []).append(n)
    for vol, ns in sorted(owners.items()):
        if len(ns) > 1 and set(ns) & fleet:
            fail(f"named volume `{vol}` is shared by services {sorted(ns)}: each needs its own")
    ok("every fleet service has named volumes of its own")
    # 4. etcd: the services the instances' [fleet] endpoints name.
    stages, instr = runtime_instructions(st.dockerfile)
    default_cmd = exec_form("Dockerfile CMD", instr.get("CMD", ["[]"])[-1])
    hc_port = None
    for e in instr.get("HEALTHCHECK", []):
        m = re.search(r"--admin[\"', =]+https?://[^:/\"']+:(\d+)", e)
        if m:
            hc_port = int(m.group(1))
    instances = {n: s for n, s in st.weir_services.items() if n in fleet}
    runs = {n: s for n, s in instances.items() if command_args(s, default_cmd)[:1] == ["run"]}
    if not runs:
        fail(f"profile `{FLEET_PROFILE}` runs no `weir run` service")
    main_cfg = load_toml(st.weir_config(default_cmd)[1])
    main_pools = {
        svc.get("name"): {p: sorted(v.get("endpoints") or []) for p, v in (svc.get("pools") or {}).items()}
        for svc in main_cfg.get("service") or []
    }
    upstreams = {}
    for name, s in st.weir_services.items():
        args = command_args(s, default_cmd)
        if args and args[0] == "upstream":
            upstreams[name] = port_of(flag(args, "--listen") or "127.0.0.1:9001")
    ids, names, etcds = {}, set(), set()
    for n, s in sorted(runs.items()):
        args = command_args(s, default_cmd)
        cfg_arg = flag(args, "--config") or flag(args, "-c") or "config/weir.toml"
        cfg_path = host_path(s, cfg_arg, f"service `{n}` --config")
        r = run_weir(weir_bin, ["check", "--config", cfg_path])
        if r.returncode != 0:
            fail(f"service `{n}` runs with {cfg_arg} = {rel(cfg_path)}, which weir check refuses:\n{r.stdout}")
        ok(f"service `{n}` runs with --config {cfg_arg} = {rel(cfg_path)}: {r.stdout.strip()}")
        c = load_toml(cfg_path)
        f = c.get("fleet")
        if not isinstance(f, dict):
            fail(f"{rel(cfg_path)} (service `{n}`) has no [fleet] section")
        inst = f.get("instance")
        if not inst:
            fail(f"{rel(cfg_path)}: [fleet] instance is unset: it would default to the container's random host name")
        if inst in ids:
            fail(f"{rel(cfg_path)}: [fleet] instance `{inst}` is also service `{ids[inst]}`'s")
        ids[inst] = n
        names.add(f.get("name"))
        # The etcd endpoints: compose services in the profile, listening there, healthy
        # before the instance starts.
        for ep in f.get("endpoints") or []:
            h, port = url_host_port(ep)
            e = st.services.get(h)
            if e is None:
                fail(f"{rel(cfg_path)}: [fleet] endpoint {ep} is no service of the stack")
            if FLEET_PROFILE not in profiles(e):
                fail(f"{rel(cfg_path)}: [fleet] endpoint {ep}: service `{h}` is not in the `{FLEET_PROFILE}` profile")
            eargs = command_args(e, [])
            listen = [u for v in [flag(eargs, "--listen-client-urls") or ""] for u in v.split(",") if u]
            if not any(url_host_port(u)[1] == port and url_host_port(u)[0] not in ("127.0.0.1", "localhost", "::1") for u in listen):
                fail(f"{rel(cfg_path)}: [fleet] endpoint {ep}: service `{h}` does not listen on port {port} off loopback (--listen-client-urls {listen})")
            if depends(s).get(h) != "service_healthy":
                fail(f"service `{n}` does not wait for `{h}` to be healthy (depends_on condition service_healthy)")
            etcds.add(h)
            ok(f"service `{n}` [fleet] instance `{inst}`, endpoint {ep} is service `{h}`, healthy first")
        # Listeners: off loopback, published; the image's health check asks the admin port.
        proxy = (c.get("proxy") or {}).get("listen", "127.0.0.1:8080")
        admin = (c.get("admin") or {}).get("listen", "127.0.0.1:9901")
        published = {cp: f"{ip}:{hp}" for ip, hp, cp in host_ports(s)}
        for what, addr in (("proxy.listen", proxy), ("admin.listen", admin)):
            if host_of(addr) in ("127.0.0.1", "::1", "localhost"):
                fail(f"{rel(cfg_path)}: {what} {addr} is loopback: unreachable from published ports")
            if port_of(addr) not in published:
                fail(f"service `{n}` does not publish {what} port {port_of(addr)} (publishes {sorted(published)})")
        if (s.get("healthcheck") or {}).get("disable"):
            fail(f"service `{n}` turns off the image's health check")
        if hc_port is not None and (s.get("healthcheck") or {}).get("test") is None and port_of(admin) != hc_port:
            fail(f"service `{n}`: the image's HEALTHCHECK asks port {hc_port}, but admin.listen is {admin}")
        if (c.get("admin") or {}).get("token_file") is None:
            env = s.get("environment") or {}
            keys = env.keys() if isinstance(env, dict) else [x.split("=", 1)[0] for x in env]
            if "WEIR_ADMIN_TOKEN" not in keys:
                fail(f"service `{n}` gets no WEIR_ADMIN_TOKEN (env_file), and weir refuses an admin listener off loopback without one")
        # The state dir: the instance's own cache, on its own named volume.
        state = (c.get("state") or {}).get("dir", "var/weir")
        vols = [(src, tgt.rstrip("/")) for kind, src, tgt in volumes(s) if kind == "volume"]
        if not os.path.isabs(state) or not any(state == t or state.startswith(t + "/") for _, t in vols):
            fail(f"{rel(cfg_path)}: state.dir {state} is not on a named volume of service `{n}` ({vols})")
        ok(f"service `{n}`: proxy {proxy} on {published[port_of(proxy)]}, admin {admin} on {published[port_of(admin)]}, state.dir on its own volume, WEIR_ADMIN_TOKEN from its env_file")
        # The same upstreams as the default stack's weir.
        pools = {
            svc.get("name"): {p: sorted(v.get("endpoints") or []) for p, v in (svc.get("pools") or {}).items()}
            for svc in c.get("service") or []
        }
        if pools != main_pools:
            fail(f"{rel(cfg_path)}: services and pools {pools} differ from the default weir's {main_pools}")
        for svc, ps in pools.items():
            for pool, eps in ps.items():
                for ep in eps:
                    if upstreams.get(host_of(ep)) != port_of(ep):
                        fail(f"{rel(cfg_path)}: service {svc} pool {pool} endpoint {ep} is no `weir upstream` service listening on port {port_of(ep)}")
        ok(f"service `{n}` fronts the default weir's services and pools: {pools}")
        # Prometheus scrapes it, as it does the default weir.
        for pname, ps in st.services.items():
            if "prometheus" not in str(ps.get("image", "")):
                continue
            pcfg = load_yaml(host_path(ps, "/etc/prometheus/prometheus.yml", f"service `{pname}` config"))
            targets = [
                t
                for j in pcfg.get("scrape_configs") or []
                if j.get("metrics_path", "/metrics") == "/metrics"
                for sc in j.get("static_configs") or []
                for t in sc.get("targets") or []
            ]
            if f"{n}:{port_of(admin)}" not in targets:
                fail(f"service `{pname}` does not scrape {n}:{port_of(admin)}/metrics (targets: {targets})")
            ok(f"service `{pname}` scrapes {n}:{port_of(admin)}/metrics")
    if len(names) != 1:
        fail(f"the fleet's instances name different fleets: {sorted(map(str, names))}")
    # 5. etcd itself: a pinned image, a health check, its data on a named volume.
    for h in sorted(etcds):
        e = st.services[h]
        image = str(e.get("image", ""))
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            fail(f"service `{h}`: image {image!r} is not pinned to a release")
        test = (e.get("healthcheck") or {}).get("test")
        if not test or (e.get("healthcheck") or {}).get("disable") or test[0] not in ("CMD", "CMD-SHELL"):
            fail(f"service `{h}` has no health check, and the weir instances wait for it")
        data = flag(command_args(e, []), "--data-dir")
        evols = [tgt.rstrip("/") for kind, _, tgt in volumes(e) if kind == "volume"]
        if not data or data.rstrip("/") not in evols:
            fail(f"service `{h}`: --data-dir {data} is not a named volume ({evols})")
        ok(f"service `{h}`: {image}, health check `{' '.join(test[1:])}`, data on a named volume")
    ok(f"fleet `{names.pop()}`: instances {sorted(ids)} on {sorted(etcds)}")


def main():
    cmd, *args = sys.argv[1:]
    {"env-files": cmd_env_files, "files": cmd_files, "grafana": cmd_grafana, "commands": cmd_commands,
     "fleet": cmd_fleet}[cmd](*args)


main()
PYEOF
pycheck() { "$py" -c "$pyprog" "$@"; }

# Env files the stack needs (weir.env): a temporary copy of the example for the check.
envs_text=$(pycheck env-files "$compose_file")
mapfile -t envs <<<"$envs_text"
for e in "${envs[@]}"; do
  [ -n "$e" ] || continue
  if [ ! -e "$e" ]; then
    [ -f "$e.example" ] || fail "env_file $e and its example $e.example are both missing"
    cp -- "$e.example" "$e"
    created_env+=("$root/$e")
  fi
done
# `config` output holds the env files' values (the admin token): kept private, in $tmp.
# Once as is, once with the fleet profile on (Compose v1 lists profiled services either
# way; v2 only with --profile).
compose_config() {
  local out=$1 what=$2
  shift 2
  (umask 077 && docker-compose -f "$compose_file" "$@" config >"$out" 2>"$tmp/compose.err") || {
    cat "$tmp/compose.err" >&2
    fail "docker-compose $what rejects $compose_file"
  }
  # On success it prints nothing else; anything on stderr is a warning (docker-compose
  # 1.29 prints e.g. "The FOO variable is not set. Defaulting to a blank string."
  # unprefixed).
  if [ -s "$tmp/compose.err" ]; then
    cat "$tmp/compose.err" >&2
    fail "docker-compose $what warns about $compose_file"
  fi
  ok "docker-compose $what accepts $compose_file ($(docker-compose version --short 2>/dev/null || echo '?'))"
}
config_out=$tmp/compose-config.yml
fleet_out=$tmp/compose-config-fleet.yml
compose_config "$config_out" config
compose_config "$fleet_out" "--profile fleet config" --profile fleet
for f in "${created_env[@]}"; do rm -f -- "$f"; done
created_env=()

# ---- 2. files -----------------------------------------------------------------------
pycheck files "$compose_file" "$fleet_out"

# ---- 3. weir check --------------------------------------------------------------------
summary=$("$weir_bin" check --config "$weir_config" 2>&1) || {
  printf '%s\n' "$summary" >&2
  fail "weir check refuses $weir_config"
}
ok "weir check $weir_config: $summary"
fleet_configs=("$fleet_dir"/*.toml)
[ -e "${fleet_configs[0]}" ] || fail "no config in $fleet_dir/ for the fleet profile"
for f in "${fleet_configs[@]}"; do
  summary=$("$weir_bin" check --config "$f" 2>&1) || {
    printf '%s\n' "$summary" >&2
    fail "weir check refuses $f"
  }
  ok "weir check $f: $summary"
done

# ---- 4. promtool ----------------------------------------------------------------------
command -v promtool >/dev/null 2>&1 || apt_install prometheus
out=$(promtool check config "$prom_config" 2>&1) || {
  printf '%s\n' "$out" >&2
  fail "promtool check config refuses $prom_config"
}
ok "promtool check config $prom_config"

# ---- 5. grafana -----------------------------------------------------------------------
pycheck grafana "$compose_file" "$config_out"

# ---- 6. commands and wiring -----------------------------------------------------------
pycheck commands "$compose_file" "$fleet_out" "$weir_bin"

# ---- 7. the fleet profile -------------------------------------------------------------
pycheck fleet "$compose_file" "$config_out" "$fleet_out" "$weir_bin"

ok "the compose stack is consistent (not built or started: that needs a Docker engine)"
