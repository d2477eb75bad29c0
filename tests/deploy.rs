//! Static checks of the deployment artifacts: `deploy/` (dashboard, alert rules, scrape config,
//! compose stack, Kubernetes manifests), the `Dockerfile` and `.dockerignore`. No network and no
//! container engine: files are parsed and checked, and `promtool` runs when it is installed.
//!
//! YAML parser: `yaml-rust2` (dev-dependency, default features off). `serde_yaml` is deprecated
//! and unmaintained; `serde_yaml_ng`, its fork, still sits on `unsafe-libyaml`, a machine
//! translation of C libyaml to unsafe Rust. `yaml-rust2` is maintained, safe Rust, YAML 1.2, has two
//! small dependencies and reads multi-document files (`---`) natively. It leaves YAML 1.1 merge
//! keys (`<<: *anchor`) as plain keys, so [`to_json`] applies them, as Compose does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use presence_worker::metrics;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every file under `deploy/`, relative to the repository root, sorted.
fn deploy_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&root().join("deploy"), &mut paths);
    let mut rel: Vec<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    rel.sort();
    rel
}

fn is_yaml(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// Converts a YAML node to JSON, applying `<<` merge keys (explicit keys win).
fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Hash(h) => {
            let mut map = serde_json::Map::new();
            if let Some(base) = h.get(&Yaml::String("<<".into())) {
                let bases = match base {
                    Yaml::Array(a) => a.clone(),
                    other => vec![other.clone()],
                };
                for b in bases {
                    let Value::Object(m) = to_json(&b) else {
                        panic!("merge key on a non-mapping: {b:?}")
                    };
                    map.extend(m);
                }
            }
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("unsupported YAML key {other:?}"),
                };
                if key != "<<" {
                    map.insert(key, to_json(v));
                }
            }
            Value::Object(map)
        }
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(r.parse::<f64>().expect("YAML real")),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => panic!("unresolved YAML node {y:?}"),
    }
}

/// The documents of a YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    docs.iter().map(to_json).collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The one document of `kind` among the Kubernetes manifests.
fn k8s(kind: &str) -> Value {
    let mut found: Vec<Value> = deploy_files()
        .iter()
        .filter(|p| p.starts_with("deploy/kubernetes/") && is_yaml(p))
        .flat_map(|p| yaml_docs(p))
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/kubernetes/");
    found.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// `30s`, `1m`, `10m`, `1h` in seconds.
fn seconds(d: &str) -> u64 {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad duration {d:?}"));
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => panic!("bad duration {d:?}"),
    }
}

#[test]
fn every_json_and_yaml_file_in_deploy_parses() {
    let files = deploy_files();
    for expected in [
        "deploy/compose.yaml",
        "deploy/grafana/dashboards/presence-worker.json",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/rules.yml",
        "deploy/prometheus/rules_test.yml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/keda.yaml",
        "deploy/kubernetes/kustomization.yaml",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} missing");
    }
    let (mut n_json, mut n_yaml) = (0, 0);
    for f in &files {
        if f.ends_with(".json") {
            assert!(json(f).is_object(), "{f}: not a JSON object");
            n_json += 1;
        } else if is_yaml(f) {
            let docs = yaml_docs(f);
            assert!(!docs.is_empty(), "{f}: no YAML document");
            for d in docs {
                assert!(d.is_object(), "{f}: a document is not a mapping: {d}");
            }
            n_yaml += 1;
        }
    }
    assert!(n_json >= 1 && n_yaml >= 9, "{n_json} JSON, {n_yaml} YAML");
}

/// Renders the real exporter after recording through every public function of the catalog, and
/// returns each metric's exposition name and `# TYPE`.
fn exported_types() -> BTreeMap<String, String> {
    let handle = metrics::install();
    metrics::events("join", "applied", 1);
    metrics::batch(1, std::time::Duration::from_millis(1));
    metrics::end_to_end_delays(std::iter::once(0), 1);
    metrics::dead_letters("invalid", 1);
    metrics::sessions_expired(1);
    metrics::reclaimed(1, 1);
    metrics::snapshots("threshold", 1);
    metrics::retry("read");
    metrics::redis_error(&presence_worker::Error::Protocol("test".into()));
    metrics::breaker(presence_worker::breaker::BreakerState::Open);
    metrics::group("presence", Some(1), 1, 1);
    metrics::sampled(1, 1, 1, 1);
    metrics::planned(1, 1);
    handle
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name kind");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

/// Every identifier starting with `presence_` in a PromQL expression.
fn presence_identifiers(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("presence_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
        if !before.is_some_and(ident) {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// Every `expr` string in the dashboard (panel targets), plus the template variable queries.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn rules() -> Vec<Value> {
    let doc = yaml("deploy/prometheus/rules.yml");
    let groups = doc["groups"].as_array().expect("rules.yml: groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("group rules").clone())
        .collect()
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    let exported = exported_types();
    let catalog: BTreeSet<&str> = metrics::ALL.iter().copied().collect();
    let names: BTreeSet<&str> = exported.keys().map(String::as_str).collect();
    assert_eq!(names, catalog, "the exporter renders exactly the catalog");
    let histograms: BTreeSet<&str> = exported
        .iter()
        .filter(|(_, kind)| *kind == "histogram")
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(histograms.contains(metrics::END_TO_END_DELAY));

    let mut exprs = Vec::new();
    dashboard_exprs(
        &json("deploy/grafana/dashboards/presence-worker.json"),
        &mut exprs,
    );
    let n_dashboard = exprs.len();
    exprs.extend(
        rules()
            .iter()
            .map(|r| str_of(&r["expr"], "rule expr").to_owned()),
    );
    let tests = yaml("deploy/prometheus/rules_test.yml");
    for t in tests["tests"].as_array().expect("rules_test.yml: tests") {
        for s in t["input_series"].as_array().expect("input_series") {
            exprs.push(str_of(&s["series"], "series").to_owned());
        }
    }
    assert!(
        n_dashboard >= 20,
        "only {n_dashboard} dashboard expressions"
    );

    let mut used = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    for expr in &exprs {
        for id in presence_identifiers(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| id.strip_suffix(s).filter(|b| histograms.contains(b)))
                .unwrap_or(&id)
                .to_owned();
            if catalog.contains(base.as_str()) {
                used.insert(base);
            } else {
                unknown.insert(id);
            }
        }
    }
    assert!(unknown.is_empty(), "not in the metric catalog: {unknown:?}");
    assert!(used.len() >= 15, "only {} catalog metrics used", used.len());
}

#[test]
fn dashboard_covers_the_required_topics() {
    let dash = json("deploy/grafana/dashboards/presence-worker.json");
    assert_eq!(dash["uid"], "presence-worker");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = str_of(&p["title"], "panel title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && pos["h"].as_u64().unwrap() > 0,
            "{title}: gridPos"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            // Every query goes through the data source variable, so the dashboard imports anywhere.
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            exprs.push(
                str_of(&t["expr"], "expr")
                    .split_whitespace()
                    .collect::<String>(),
            );
        }
    }
    let has = |needles: &[&str]| exprs.iter().any(|e| needles.iter().all(|n| e.contains(n)));
    let topics: [(&str, &[&str]); 9] = [
        (
            "events by outcome",
            &["presence_events_total", "by(outcome)"],
        ),
        ("lag per group", &["presence_group_lag", "by(group)"]),
        (
            "pending per group",
            &["presence_group_pending", "by(group)"],
        ),
        ("breaker state", &["presence_breaker_state"]),
        ("dead letters", &["presence_dead_letters_total"]),
        ("snapshots", &["presence_snapshots_emitted_total"]),
        ("expirations", &["presence_sessions_expired_total"]),
        (
            "redis errors",
            &["presence_redis_errors_total", "by(class)"],
        ),
        ("replicas up", &["up{job="]),
    ];
    for (topic, needles) in topics {
        assert!(has(needles), "no panel for {topic} ({needles:?})");
    }
    for q in ["0.5", "0.99"] {
        let needles = [
            &format!("histogram_quantile({q},")[..],
            "presence_end_to_end_delay_seconds_bucket",
        ];
        assert!(has(&needles), "no end-to-end delay p{q}");
    }
}

#[test]
fn rules_have_the_required_alerts() {
    let rules = rules();
    let mut alerts = BTreeMap::new();
    for r in &rules {
        let name = str_of(&r["alert"], "alert name");
        let severity = str_of(&r["labels"]["severity"], "severity");
        assert!(["warning", "critical"].contains(&severity), "{name}");
        assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
        let expr = str_of(&r["expr"], "expr")
            .split_whitespace()
            .collect::<String>();
        let r#for = r["for"].as_str().map_or(0, seconds);
        assert!(alerts.insert(name, (expr, r#for)).is_none(), "{name} twice");
    }
    let alert = |name: &str, needles: &[&str], min_for: u64| {
        let (expr, r#for) = alerts
            .get(name)
            .unwrap_or_else(|| panic!("no alert {name}"));
        for n in needles {
            assert!(expr.contains(n), "{name}: {n} not in {expr}");
        }
        assert!(
            *r#for >= min_for,
            "{name}: for {for}s < {min_for}s",
            r#for = r#for
        );
    };
    alert(
        "PresenceGroupLagGrowing",
        &["deriv(presence_group_lag["],
        300,
    );
    alert("PresenceBreakerOpen", &["presence_breaker_state)>0"], 60);
    alert(
        "PresenceDeadLetters",
        &["increase(presence_dead_letters_total["],
        0,
    );
    // "No ready replica": readiness is not a metric, so the scrape stands in (see rules.yml).
    alert(
        "PresenceNoReplicaUp",
        &[
            "sum(up{job=\"presence-worker\"})==0",
            "absent(up{job=\"presence-worker\"})",
        ],
        60,
    );
    alert(
        "PresenceDelayP99High",
        &[
            "histogram_quantile(0.99,",
            "presence_end_to_end_delay_seconds_bucket",
        ],
        300,
    );

    // The job the rules and the dashboard select on is the one the scrape config defines, and it
    // scrapes the compose replicas on the worker's HTTP port.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(prom["rule_files"], serde_json::json!(["rules.yml"]));
    let jobs = prom["scrape_configs"].as_array().expect("scrape_configs");
    let job = jobs.iter().find(|j| j["job_name"] == "presence-worker");
    let targets = &job.expect("job presence-worker")["static_configs"][0]["targets"];
    let compose = yaml("deploy/compose.yaml");
    let workers: Vec<Value> = worker_services(&compose)
        .iter()
        .map(|(name, _)| Value::from(format!("{name}:9464")))
        .collect();
    assert_eq!(targets, &Value::Array(workers));
}

/// Runs promtool from the repository root; `None` when it is not installed.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("promtool: {e}"),
    }
}

#[test]
fn promtool_checks_rules_config_and_rule_tests() {
    if promtool(&["--version"]).is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not on the PATH: .ci/run must install the Debian package prometheus"
        );
        println!("SKIPPED: apt-get install prometheus");
        return;
    }
    for args in [
        &["check", "rules", "deploy/prometheus/rules.yml"][..],
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        &["test", "rules", "deploy/prometheus/rules_test.yml"],
    ] {
        let out = promtool(args).expect("promtool");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

/// Dockerfile instructions as (keyword, arguments), continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur = cur + part.trim() + " ",
            None => {
                cur += t;
                let (k, rest) = cur.split_once(' ').unwrap_or((&cur, ""));
                out.push((k.to_uppercase(), rest.trim().to_owned()));
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_cached_pinned_and_non_root() {
    let ins = dockerfile();
    let pos = |pred: &dyn Fn(&(String, String)) -> bool, what: &str| {
        ins.iter()
            .position(pred)
            .unwrap_or_else(|| panic!("Dockerfile: no {what}"))
    };
    let froms: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
    assert!(froms.len() >= 2, "multi-stage");
    let mut stages = Vec::new();
    for &i in &froms {
        let words: Vec<&str> = ins[i].1.split_whitespace().collect();
        let image = words.iter().find(|w| !w.starts_with("--")).expect("image");
        let (name, tag) = image.split_once(':').unwrap_or((image, ""));
        let tag = tag.split('@').next().unwrap();
        assert!(!name.contains('$') && !tag.is_empty(), "{image}: untagged");
        assert_ne!(tag, "latest", "{image}");
        if let Some(a) = words.iter().position(|w| w.eq_ignore_ascii_case("as")) {
            stages.push(words[a + 1].to_owned());
        }
        assert!(
            i != froms[0] || (name == "rust" && tag.starts_with(|c: char| c.is_ascii_digit())),
            "builder: the official rust image at a version tag, got {image}"
        );
    }
    let last = *froms.last().unwrap();
    assert!(ins[last].1.contains("distroless"), "small runtime image");
    let is = |k: &str, needle: &'static str| {
        let k = k.to_owned();
        move |(kw, args): &(String, String)| *kw == k && args.contains(needle)
    };
    // Dependency layer: manifests, a dummy build, then the real sources and the real build.
    let manifests = pos(&is("COPY", "Cargo.lock"), "COPY of Cargo.lock");
    assert!(ins[manifests].1.contains("build.rs") && ins[manifests].1.contains("Cargo.toml"));
    let dummy = pos(&is("RUN", "cargo build --release --locked"), "dummy build");
    assert!(ins[dummy].1.contains("src/main.rs") && ins[dummy].1.contains("src/lib.rs"));
    let sources = pos(&is("COPY", "src ./src"), "COPY of src");
    let build = is("RUN", "cargo build --release --locked");
    let real = (sources..ins.len())
        .find(|&i| build(&ins[i]))
        .expect("the real build after COPY src");
    assert!(manifests < dummy && dummy < sources && sources < real && real < last);
    assert!(
        ins[real].1.contains("touch src/main.rs src/lib.rs"),
        "cargo must see new sources"
    );
    // build.rs reads GIT_SHA: a build argument, declared after the dependency layer.
    let arg = pos(&is("ARG", "GIT_SHA"), "ARG GIT_SHA");
    assert!(dummy < arg && arg < real && ins[real].1.contains("GIT_SHA"));
    // The runtime takes only the binary from a named build stage.
    let copies: Vec<&String> = ins[last..]
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    assert!(!copies.is_empty(), "the runtime stage copies the binary");
    for a in copies {
        let from = a.split_whitespace().find_map(|w| w.strip_prefix("--from="));
        assert!(
            from.is_some_and(|f| stages.iter().any(|s| s == f)),
            "COPY {a}"
        );
    }

    let runtime = &ins[last..];
    let user = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .expect("USER");
    let uid = user.1.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0),
        "numeric non-root USER: {uid}"
    );
    assert!(runtime
        .iter()
        .any(|(k, a)| k == "EXPOSE" && a.split_whitespace().any(|p| p == "9464")));
    for k in ["ENTRYPOINT", "CMD"] {
        let (_, a) = runtime.iter().find(|(kw, _)| kw == k).expect(k);
        assert!(a.starts_with('['), "{k} in exec form (no shell at runtime)");
    }
    let labels: String = runtime
        .iter()
        .filter(|(k, _)| k == "LABEL")
        .map(|(_, a)| a.as_str())
        .collect();
    for (key, value) in [
        ("title", "\"presence-worker\"".to_owned()),
        ("version", format!("{:?}", env!("CARGO_PKG_VERSION"))),
        ("licenses", format!("{:?}", env!("CARGO_PKG_LICENSE"))),
        ("revision", "\"${GIT_SHA}\"".to_owned()),
        ("description", String::new()),
    ] {
        let label = format!("org.opencontainers.image.{key}={value}");
        assert!(labels.contains(&label), "no OCI label {label}");
    }

    // Nothing secret goes in: no whole-context copy, no key or env files, no credentials.
    for (k, a) in &ins {
        let lower = a.to_lowercase();
        if k == "COPY" || k == "ADD" {
            assert!(
                !lower.starts_with(". ") && !lower.contains(" . ."),
                "{k} {a}: whole context"
            );
            for bad in [
                ".env",
                ".pem",
                ".key",
                "id_rsa",
                "credentials",
                "secret",
                ".git",
            ] {
                assert!(!lower.contains(bad), "{k} {a}");
            }
        }
        if k == "ENV" || k == "ARG" {
            for bad in ["password", "token", "secret", "redis_url", "@"] {
                assert!(!lower.contains(bad), "{k} {a}");
            }
        }
    }
    assert!(!ins.iter().any(|(k, _)| k == "ADD"), "COPY, not ADD");

    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
    let ignored = |names: &[&str]| ignore.iter().any(|l| names.contains(&l.as_str()));
    assert!(
        ignored(&["target", "target/", "/target", "target/**"]),
        ".dockerignore: target/"
    );
    assert!(ignored(&[".git", ".git/", "/.git"]), ".dockerignore: .git");
}

/// Every environment variable the command line reads (`REDIS_URL`, `PRESENCE_*`).
fn cli_env_vars() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        cmd.get_subcommands().for_each(|c| walk(c, out));
    }
    let mut out = BTreeSet::new();
    walk(&presence_worker::cli::Cli::command(), &mut out);
    out
}

/// Asserts that a variable a manifest sets for the worker is one the worker reads.
fn assert_known_env(name: &str, known: &BTreeSet<String>, file: &str) {
    if name.starts_with("PRESENCE_") || name.starts_with("REDIS_") {
        assert!(known.contains(name), "{file}: the worker reads no {name}");
    }
}

#[test]
fn kubernetes_manifests_probe_limit_and_scale_the_worker() {
    let known = cli_env_vars();
    assert!(known.contains("PRESENCE_CONSUMER") && known.contains("REDIS_URL"));
    let deploy = k8s("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        &labels["app.kubernetes.io/name"]
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let env = c["env"].as_array().expect("env");
    let var = |name: &str| env.iter().find(|e| e["name"] == name);
    for e in env {
        assert_known_env(str_of(&e["name"], "env name"), &known, "deployment.yaml");
    }

    // SIGTERM drains for --drain-timeout; the grace period must leave it the time.
    let drain = var("PRESENCE_DRAIN_TIMEOUT").map_or(10, |e| seconds(str_of(&e["value"], "drain")));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} <= drain {drain}s"
    );

    let port = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["containerPort"] == 9464);
    let port_name = str_of(&port.expect("containerPort 9464")["name"], "port name");
    assert_eq!(port_name, "http-metrics");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == 9464 || get["port"] == port_name,
            "{probe} port"
        );
    }
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][res].is_null(),
                "resources.{kind}.{res}"
            );
        }
    }
    let sc = &c["securityContext"];
    assert!(sc["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));

    let url = var("REDIS_URL").expect("REDIS_URL");
    assert!(url["value"].is_null(), "REDIS_URL must come from a Secret");
    let secret = &url["valueFrom"]["secretKeyRef"];
    assert!(
        secret["name"].is_string() && secret["key"].is_string(),
        "REDIS_URL secretKeyRef"
    );
    let consumer = var("PRESENCE_CONSUMER").expect("PRESENCE_CONSUMER");
    assert_eq!(
        consumer["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );

    let svc = k8s("Service");
    let sport = &svc["spec"]["ports"][0];
    assert_eq!(
        (&sport["name"], &sport["port"]),
        (&Value::from("http-metrics"), &Value::from(9464))
    );
    for sel in [
        &svc["spec"]["selector"],
        &k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ] {
        let sel = sel.as_object().expect("selector");
        assert!(
            !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v),
            "{sel:?}"
        );
    }
    let pdb = k8s("PodDisruptionBudget");
    assert!(!pdb["spec"]["maxUnavailable"].is_null() || !pdb["spec"]["minAvailable"].is_null());

    let so = k8s("ScaledObject");
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    // Never to zero: the replicas also expire silent sessions and reclaim pending entries.
    assert!(so["spec"]["minReplicaCount"]
        .as_u64()
        .is_some_and(|n| n >= 1));
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "redis-streams");
    let m = &trigger["metadata"];
    assert_eq!(
        (&m["stream"], &m["consumerGroup"]),
        (&Value::from("sessions:events"), &Value::from("presence"))
    );
    for key in ["lagCount", "activationLagCount"] {
        assert!(str_of(&m[key], key).parse::<u64>().is_ok(), "{key}");
    }
    let auth = k8s("TriggerAuthentication");
    assert_eq!(
        trigger["authenticationRef"]["name"],
        auth["metadata"]["name"]
    );
    let refs = auth["spec"]["secretTargetRef"]
        .as_array()
        .expect("secretTargetRef");
    assert!(refs
        .iter()
        .any(|r| r["parameter"] == "password" && r["name"] == secret["name"]));

    let kust = yaml("deploy/kubernetes/kustomization.yaml");
    for r in kust["resources"].as_array().expect("resources") {
        let path = format!("deploy/kubernetes/{}", str_of(r, "resource"));
        assert!(root().join(&path).is_file(), "{path} missing");
    }
}

/// Fails on a mapping key that names a credential and holds a literal, and on a URL with a
/// password in it. References (`secretKeyRef`, `secretTargetRef`, `...FromEnv`) hold none.
fn assert_no_plaintext_secret(v: &Value, file: &str) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = k.to_lowercase();
                if ["password", "passwd", "token", "apikey"]
                    .iter()
                    .any(|s| key.contains(s))
                {
                    assert!(
                        !v.is_string() && !v.is_number(),
                        "{file}: {k} holds a literal"
                    );
                }
                assert_no_plaintext_secret(v, file);
            }
            assert!(
                m.get("kind") != Some(&Value::from("Secret")),
                "{file}: a Secret manifest"
            );
        }
        Value::Array(a) => a.iter().for_each(|v| assert_no_plaintext_secret(v, file)),
        Value::String(s) => {
            for (i, _) in s.match_indices("://") {
                let authority = s[i + 3..].split(['/', ' ', '\n']).next().unwrap_or("");
                let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
                assert!(
                    !userinfo.is_some_and(|u| u.contains(':')),
                    "{file}: password in {s}"
                );
            }
        }
        _ => {}
    }
}

#[test]
fn no_plaintext_credentials_in_deploy() {
    let mut checked = 0;
    for f in deploy_files().iter().filter(|f| is_yaml(f)) {
        yaml_docs(f)
            .iter()
            .for_each(|d| assert_no_plaintext_secret(d, f));
        // The same on the raw text, comments aside: a `password:` key with a value on its line.
        for line in read(f).lines() {
            let code = line.split(" #").next().unwrap();
            if code.trim_start().starts_with('#') {
                continue;
            }
            if let Some((_, value)) = code.to_lowercase().split_once("password:") {
                assert!(value.trim().is_empty(), "{f}: {line}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 9);
    let json_values = json("deploy/grafana/dashboards/presence-worker.json");
    assert_no_plaintext_secret(&json_values, "presence-worker.json");
}

/// Compose services that run the worker image, with their merged definitions, in file order.
fn worker_services(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"].as_object().expect("services");
    services
        .iter()
        .filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("presence-worker"))
        })
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

#[test]
fn compose_runs_redis_three_workers_prometheus_and_a_producer() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_object().expect("services");
    let known = cli_env_vars();

    for (name, s) in services {
        let image = str_of(&s["image"], name);
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "{name}: unpinned image {image}"
        );
    }
    let redis = &services["redis"];
    assert!(str_of(&redis["image"], "redis image").starts_with("redis:7.2"));
    let args: Vec<&str> = redis["command"]
        .as_array()
        .expect("redis command")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "redis AOF: {args:?}"
    );

    // Three replicas from one anchor, each with its own consumer name.
    let text = read("deploy/compose.yaml");
    assert!(text.contains("&worker") && text.matches("<<: *worker").count() >= 3);
    let workers = worker_services(&compose);
    assert_eq!(workers.len(), 3, "three worker services");
    let mut consumers = BTreeSet::new();
    for (name, w) in &workers {
        assert_eq!(w["command"], serde_json::json!(["run"]), "{name}");
        assert!(
            !w["build"]["context"].is_null(),
            "{name}: built from the Dockerfile"
        );
        let env = w["environment"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: environment map"));
        assert_eq!(env["REDIS_URL"], "redis://redis:6379", "{name}");
        env.keys()
            .for_each(|k| assert_known_env(k, &known, "compose.yaml"));
        consumers.insert(str_of(&env["PRESENCE_CONSUMER"], "PRESENCE_CONSUMER").to_owned());
    }
    assert_eq!(consumers.len(), 3, "distinct consumer names: {consumers:?}");

    let prom = &services["prometheus"];
    let mounts: Vec<&str> = prom["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| str_of(v, "volume"))
        .collect();
    for file in ["prometheus.yml", "rules.yml"] {
        let mount = format!("./prometheus/{file}:/etc/prometheus/{file}");
        assert!(
            mounts.iter().any(|m| m.starts_with(&mount)),
            "prometheus mounts {mount}"
        );
    }
    // Every bind mount in the file points at something that exists next to compose.yaml.
    for s in services.values() {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let src = str_of(v, "volume").split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(root().join("deploy").join(src).exists(), "{src} missing");
            }
        }
    }
    let producer = services
        .values()
        .find(|s| s["command"].to_string().contains("XADD sessions:events"));
    let producer = producer.expect("a producer service appending to sessions:events");
    assert!(
        producer["command"].to_string().contains("type"),
        "flat-form entries"
    );
}
