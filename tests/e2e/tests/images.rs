//! The two ways to build the images say the same thing: the Dockerfile's final stages (for
//! people with Docker) and `tools/images.sh` (OCI archives without Docker, from
//! `tools/images/images.tsv`).
//!
//! The test parses the Dockerfile's stages and asks `tools/images.sh --configs` for the image
//! configs it writes (the same function writes them into the archives), then compares, per
//! image: the base (FROM against the table's base kind), the binary and its cargo profile (the
//! build stage's copy out of `target/<triple>/<profile>/`), the binary's path (COPY
//! destination), ENTRYPOINT, USER, EXPOSE and STOPSIGNAL. Fast: no build, no network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One final stage of the Dockerfile, as far as an image's config and layout go.
#[derive(Debug, Default)]
struct Stage {
    from: String,
    /// `COPY --from=build <source> <dest>`.
    copies: Vec<(String, String)>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    expose: BTreeSet<String>,
    stopsignal: Option<String>,
    /// The build stage's `RUN` text (continuations joined), for the profiles.
    run: String,
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_owned());
        }
        cur.clear();
    }
    out
}

/// Stages by name (`FROM <image> AS <name>`).
fn stages(text: &str) -> BTreeMap<String, Stage> {
    let mut all = BTreeMap::new();
    let mut name: Option<String> = None;
    for ins in instructions(text) {
        let (op, rest) = ins.split_once(char::is_whitespace).unwrap_or((&ins, ""));
        let rest = rest.trim();
        if op.eq_ignore_ascii_case("FROM") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [image, as_, n] = words[..] else {
                panic!("FROM without AS <name>: {ins}");
            };
            assert!(as_.eq_ignore_ascii_case("AS"), "{ins}");
            all.insert(
                n.to_owned(),
                Stage {
                    from: image.to_owned(),
                    ..Stage::default()
                },
            );
            name = Some(n.to_owned());
            continue;
        }
        let Some(stage) = name.as_ref().and_then(|n| all.get_mut(n)) else {
            continue;
        };
        match op.to_ascii_uppercase().as_str() {
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words.first() == Some(&"--from=build") && words.len() == 3 {
                    stage
                        .copies
                        .push((words[1].to_owned(), words[2].to_owned()));
                }
            }
            "USER" => stage.user = Some(rest.to_owned()),
            "ENTRYPOINT" => {
                stage.entrypoint =
                    Some(serde_json::from_str(rest).expect("ENTRYPOINT in exec (JSON) form"));
            }
            "EXPOSE" => stage
                .expose
                .extend(rest.split_whitespace().map(|p| format!("{p}/tcp"))),
            "STOPSIGNAL" => stage.stopsignal = Some(rest.to_owned()),
            "RUN" => stage.run.push_str(rest),
            _ => {}
        }
    }
    all
}

/// One line of `tools/images/images.tsv`.
#[derive(Debug)]
struct Row {
    base: String,
    profile: String,
    package: String,
    binary: String,
    path: String,
}

fn table() -> BTreeMap<String, Row> {
    let text = std::fs::read_to_string(repo().join("tools/images/images.tsv")).expect("table");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 9, "nine fields: {l}");
            (
                f[0].to_owned(),
                Row {
                    base: f[1].to_owned(),
                    profile: f[2].to_owned(),
                    package: f[3].to_owned(),
                    binary: f[4].to_owned(),
                    path: f[5].to_owned(),
                },
            )
        })
        .collect()
}

/// The image configs `tools/images.sh` writes, by image name.
fn configs() -> BTreeMap<String, serde_json::Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("bash")
        .arg(repo().join("tools/images.sh"))
        .arg("--configs")
        .arg(dir.path())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "tools/images.sh --configs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_dir(dir.path())
        .expect("configs")
        .map(|e| {
            let p = e.expect("entry").path();
            let name = p.file_stem().expect("name").to_string_lossy().into_owned();
            let v = serde_json::from_str(&std::fs::read_to_string(&p).expect("read"))
                .expect("valid JSON");
            (name, v)
        })
        .collect()
}

/// The Docker base image each of the table's base kinds stands for.
fn docker_base(kind: &str) -> &'static str {
    match kind {
        "static" => "gcr.io/distroless/static-debian12:nonroot",
        "scratch" => "scratch",
        "postgres" => "postgres:15-bookworm",
        "rsync" => "debian:bookworm-slim",
        other => panic!("unknown base kind {other}"),
    }
}

#[test]
fn the_dockerfile_and_tools_images_sh_build_the_same_images() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut stages = stages(&dockerfile);
    let build = stages.remove("build").expect("a build stage");
    let table = table();
    let configs = configs();
    let finals: BTreeSet<&String> = stages.keys().collect();
    assert_eq!(
        finals,
        configs.keys().collect(),
        "Dockerfile targets vs images"
    );
    assert_eq!(
        finals,
        table.keys().collect(),
        "Dockerfile targets vs table"
    );

    for (name, stage) in &stages {
        let row = &table[name];
        let cfg = &configs[name]["config"];
        assert_eq!(stage.from, docker_base(&row.base), "{name}: base");
        // The build stage builds the table's package and binary...
        let selected = format!("-p {} --bin {}", row.package, row.binary);
        assert!(
            build.run.contains(&selected),
            "{name}: build stage runs {selected}"
        );
        // ... copies the binary out of the table's profile...
        let built = format!("target/${{TARGET}}/{}/{}", row.profile, row.binary);
        assert!(
            build.run.contains(&built),
            "{name}: build stage copies {built}"
        );
        // ... and the final stage puts it at the table's path, which is the entrypoint.
        assert_eq!(
            stage.copies,
            [(format!("/out/{}", row.binary), row.path.clone())],
            "{name}: files from the build"
        );
        let entry: Vec<String> =
            serde_json::from_value(cfg["Entrypoint"].clone()).expect("Entrypoint");
        assert_eq!(
            stage.entrypoint.as_ref(),
            Some(&entry),
            "{name}: ENTRYPOINT"
        );
        assert_eq!(
            entry,
            [row.path.as_str()],
            "{name}: entrypoint is the binary"
        );
        assert_eq!(stage.user.as_deref(), cfg["User"].as_str(), "{name}: USER");
        let user = stage.user.as_deref().unwrap_or("0");
        assert!(
            user.split(':')
                .all(|id| id.parse::<u32>().is_ok_and(|id| id != 0)),
            "{name}: USER {user} must be numeric and not root (runAsNonRoot)"
        );
        let exposed: BTreeSet<String> = cfg["ExposedPorts"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(stage.expose, exposed, "{name}: EXPOSE");
        assert_eq!(
            stage.stopsignal.as_deref(),
            cfg["StopSignal"].as_str(),
            "{name}: STOPSIGNAL"
        );
    }
    // What the Docker base images set and tools/images.sh must repeat.
    for (name, row) in &table {
        let cfg = &configs[name]["config"];
        let env: Vec<String> = serde_json::from_value(cfg["Env"].clone()).expect("Env");
        if row.base == "static" {
            assert_eq!(
                cfg["WorkingDir"], "/home/nonroot",
                "{name}: distroless' home"
            );
            assert!(
                env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned()),
                "{name}: distroless' SSL_CERT_FILE"
            );
        }
        if row.base == "postgres" {
            assert!(
                env.contains(&"PGDATA=/var/lib/postgresql/data".to_owned()),
                "{name}: the postgres image's PGDATA"
            );
        }
    }
}
