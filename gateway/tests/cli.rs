//! The `spillway` binary: configuration checking, start-up errors, and the demo's exit code.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory per call: tests run in parallel.
fn scratch_dir() -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("spillway-cli-{}-{n}", std::process::id()))
}

fn spillway(args: &[&str], config: Option<&str>) -> Output {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
    command
        .args(args)
        .env_remove("SPILLWAY_CONFIG")
        .env("RUST_LOG", "warn");
    if let Some(text) = config {
        let path = dir.join("spillway.toml");
        std::fs::write(&path, text).unwrap();
        command.arg("--config").arg(path);
    }
    command.output().expect("spillway runs")
}

const VALID: &str = r#"
[[backends]]
id = "ptu-eastus"
url = "https://contoso-ptu-eastus.openai.azure.com"
region = "eastus"
priority = 1
deployments = { "gpt-4o" = "gpt-4o-ptu", "text-embedding-3-small" = "emb" }

[[backends]]
id = "payg-westus"
url = "https://contoso-payg-westus.openai.azure.com"
priority = 2
deployments = { "gpt-4o" = "gpt-4o" }
"#;

#[test]
fn check_config_prints_pools_tiers_and_backends() {
    let out = spillway(&["check-config"], Some(VALID));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gpt = stdout.find("pool gpt-4o").expect("gpt-4o pool listed");
    let tier1 = stdout[gpt..].find("tier 1").unwrap();
    let tier2 = stdout[gpt..].find("tier 2").unwrap();
    assert!(tier1 < tier2, "{stdout}");
    assert!(stdout.contains("deployment=gpt-4o-ptu"));
    assert!(stdout.contains("pool text-embedding-3-small"));
}

#[test]
fn check_config_names_the_bad_key_and_fails() {
    let broken = VALID.replace("priority = 2", "priority = 0");
    let out = spillway(&["check-config"], Some(&broken));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backends[1].priority"), "{stderr}");
}

#[test]
fn serve_refuses_to_start_on_an_invalid_configuration() {
    let out = spillway(&["serve"], Some("[server]\nlisten = \"not-an-address\"\n"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen"), "{stderr}");
}

#[test]
fn environment_overrides_a_key() {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spillway.toml");
    std::fs::write(&path, VALID).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env("SPILLWAY__ROUTING__MAX_ATTEMPTS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the override reached validation");
    assert!(String::from_utf8_lossy(&out.stderr).contains("routing.max_attempts"));
}

#[test]
fn the_demo_runs_and_reports_that_no_client_saw_a_429() {
    let out = spillway(&["demo", "--duration", "3s", "--replicas", "2"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("t=  1s"), "{stdout}");
    let clients = stdout
        .lines()
        .find(|l| l.starts_with("Clients:"))
        .expect("summary line");
    assert!(clients.contains(" 0 saw 429, 0 errors"), "{clients}");
}

#[test]
fn the_shipped_compose_configurations_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/");
    let check = |key: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command.args(["check-config", "--config", &format!("{root}spillway.toml")]);
        match key {
            Some(key) => command.env("SPILLWAY_LOCAL_KEY", key),
            None => command.env_remove("SPILLWAY_LOCAL_KEY"),
        };
        command.output().unwrap()
    };
    let out = check(Some("compose-key"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It serves beyond loopback, so it authenticates: without its key it does not start.
    let out = check(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SPILLWAY_LOCAL_KEY is not set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sim =
        spillway_gateway::sim::SimConfig::load(std::path::Path::new(&format!("{root}sim.toml")))
            .unwrap();
    assert_eq!(sim.resources.len(), 4, "PTU and PAYG in two regions");
    // Every backend names a simulated resource, by port and region.
    let gateway = spillway_gateway::config::Config::load(Some(std::path::Path::new(&format!(
        "{root}spillway.toml"
    ))))
    .unwrap();
    assert_eq!(gateway.backends.len(), sim.resources.len());
    for backend in &gateway.backends {
        let port = url::Url::parse(&backend.url).unwrap().port();
        let resource = sim
            .resources
            .iter()
            .find(|r| Some(r.listen.port()) == port)
            .unwrap_or_else(|| panic!("no simulated resource on {}", backend.url));
        assert_eq!(resource.name, backend.id);
        assert_eq!(resource.region, backend.region);
    }
}

#[test]
fn state_explains_that_embedded_state_is_not_shared() {
    let out = spillway(&["state"], Some(VALID));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("state.redis_url is not set"), "{stderr}");
    assert!(stderr.contains("/admin/state"), "{stderr}");
}

/// `spillway hash-key` with `stdin` as its input.
fn hash_key(stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spillway runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_key_prints_the_sha256_of_the_key_and_never_the_key() {
    // `printf s3cret | sha256sum`; a typed line's ending is not part of the key.
    let expected = "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0\n";
    for input in ["s3cret", "s3cret\n", "s3cret\r\n"] {
        let out = hash_key(input);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{input:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));
    }
    let empty = hash_key("\n");
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no key on stdin"));
}

#[test]
fn a_consumer_needs_exactly_one_well_formed_key() {
    let both = format!(
        "{VALID}\n[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\nkey_env = \"HOME\"\n",
        "ab".repeat(32)
    );
    let out = spillway(&["check-config"], Some(&both));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly one of key_sha256 and key_env"));
    let short = format!("{VALID}\n[[consumers]]\nname = \"app\"\nkey_sha256 = \"abc\"\n");
    let out = spillway(&["check-config"], Some(&short));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("consumers[0].key_sha256"));
    let good = format!(
        "{VALID}\n[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
        "ab".repeat(32)
    );
    assert!(spillway(&["check-config"], Some(&good)).status.success());
}

/// `check-config` reports every problem in one run, each naming its key, the configuration's
/// own and what resolving its variables and credentials finds; `--offline` checks the file
/// alone, without any of the variables a pod would have.
#[test]
fn check_config_reports_every_problem_at_once_and_offline_reads_nothing_else() {
    let config = r#"
[server]
listen = "0.0.0.0:8080"
admin_listen = "0.0.0.0:9090"
admin_token_env = "SPILLWAY_CLI_TEST_UNSET_ADMIN"

[[backends]]
id = "ptu"
url = "https://contoso.openai.azure.com"
auth = { type = "workload-identity" }
deployments = { "gpt-4o" = "gpt-4o" }

[[backends]]
id = "payg"
url = "https://contoso-payg.openai.azure.com"
auth = { type = "api-key", env = "SPILLWAY_CLI_TEST_UNSET_KEY" }
deployments = { "gpt-4o" = "gpt-4o-payg" }

[[consumers]]
name = "app"
key_env = "SPILLWAY_CLI_TEST_UNSET_CONSUMER"
"#;
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spillway.toml");
    std::fs::write(&path, config).unwrap();
    let run = |offline: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command.arg("check-config").arg("--config").arg(&path);
        if offline {
            command.arg("--offline");
        }
        for var in [
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
        ] {
            command.env_remove(var);
        }
        command.output().unwrap()
    };
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in [
        "server.admin_token_env",
        "backends[0].auth",
        "backends[1].auth.env",
        "consumers[0].key_env",
    ] {
        assert!(
            stderr.contains(&format!("  - {key}: ")),
            "{key} missing:\n{stderr}"
        );
    }
    let offline = run(true);
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert!(String::from_utf8_lossy(&offline.stdout).contains("offline"));
}

/// `spillway sim --port-base N` listens on N, N+1, ... in order, and the `[[backends]]` it
/// prints carry the simulator's `tpm`, so the pasted configuration spills on budget and
/// passes `check-config` as it is.
#[test]
fn the_simulator_takes_fixed_ports_and_prints_backends_with_their_budgets() {
    use std::io::{BufRead, BufReader};
    // Four consecutive free ports.
    let base = (20_000u16..60_000)
        .step_by(97)
        .find(|&p| (p..p + 4).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()))
        .expect("four free ports in a row");
    let mut sim = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["sim", "--port-base", &base.to_string()])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut printed = String::new();
    for line in BufReader::new(sim.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line == "# sim ready";
        printed.push_str(&line);
        printed.push('\n');
        if done {
            break;
        }
    }
    let _ = sim.kill();
    let _ = sim.wait();
    for port in base..base + 4 {
        assert!(
            printed.contains(&format!("url = \"http://127.0.0.1:{port}\"")),
            "{printed}"
        );
    }
    assert!(printed.contains("tpm = 20000"), "{printed}");
    assert!(printed.contains("tpm = 450000"), "{printed}");
    let out = spillway(&["check-config"], Some(&printed));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `spillway` with no configuration at all says how to give one.
#[test]
fn serve_without_a_configuration_says_how_to_give_one() {
    let out = spillway(&[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--config") && stderr.contains("SPILLWAY_CONFIG"),
        "{stderr}"
    );
}
