//! The README's tour of the API (`docs/tour.sh`): the README shows exactly
//! its commands, and it runs as written against the real binary on a fresh
//! server, every step answering the status it states.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::both_backends;
use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, append_to_log, binary, policies_dir,
};

both_backends!(the_tour_runs_as_written);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> String {
    std::fs::read_to_string(repo().join("docs/tour.sh")).expect("docs/tour.sh")
}

/// The parts of the script the README shows: `(name, text)` for each part
/// between a `# readme: NAME` line and the next `# readme: end`. Nothing but
/// blank lines may stand between parts, or after the last: the tour runs
/// nothing the README does not show.
fn script_parts(script: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut open: Option<(String, String)> = None;
    let mut seen_first = false;
    for (n, line) in script.lines().enumerate() {
        match (line.strip_prefix("# readme: "), open.as_mut()) {
            (Some("end"), Some(_)) => parts.push(open.take().unwrap()),
            (Some("end"), None) => panic!("docs/tour.sh:{}: an end without a part", n + 1),
            (Some(name), None) => {
                open = Some((name.to_owned(), String::new()));
                seen_first = true;
            }
            (Some(_), Some((name, _))) => {
                panic!("docs/tour.sh:{}: a part inside part {name}", n + 1)
            }
            (None, Some((_, text))) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => assert!(
                !seen_first || line.trim().is_empty(),
                "docs/tour.sh:{}: runs outside the parts the README shows: {line}",
                n + 1
            ),
        }
    }
    assert!(open.is_none(), "docs/tour.sh: a part without its end");
    parts
}

/// The README's tour blocks: `(name, text)` for each ```sh block right
/// after a `<!-- tour: NAME -->` line.
fn readme_blocks(readme: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .strip_prefix("<!-- tour: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.get(i + 1), Some(&"```sh"), "README: {line}");
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| **l != "```")
            .copied()
            .collect();
        let mut text = body.join("\n");
        text.push('\n');
        blocks.push((name.to_owned(), text));
    }
    blocks
}

#[test]
fn the_readme_shows_the_tour_as_it_is() {
    let script = script();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let parts = script_parts(&script);
    let blocks = readme_blocks(&readme);
    assert!(
        parts.len() >= 5,
        "{:?}",
        parts.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for (name, text) in &parts {
        let shown: Vec<&String> = blocks
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t)
            .collect();
        assert_eq!(
            shown.len(),
            1,
            "the README must show part {name} of docs/tour.sh once, as\n\
             <!-- tour: {name} -->\n```sh\n{text}```"
        );
        assert!(
            shown[0] == text,
            "the README's block {name} differs from docs/tour.sh; it must read:\n```sh\n{text}```"
        );
    }
    for (name, _) in &blocks {
        assert!(
            parts.iter().any(|(n, _)| n == name),
            "the README shows a tour block {name} that docs/tour.sh does not have"
        );
    }
    // Every request the README shows is one the tour makes, but for the
    // subscriptions, whose answers never end.
    let mut in_block = false;
    let mut in_tour = false;
    let mut previous = "";
    for line in readme.lines() {
        if line.starts_with("```") {
            // The production example's block is run too, by production.rs.
            in_tour = !in_block
                && (previous.starts_with("<!-- tour: ")
                    || previous.starts_with("<!-- production: "));
            in_block = !in_block;
        } else if in_block && !in_tour && line.contains("curl ") {
            assert!(
                line.contains("/subscribe"),
                "the README shows a request that the tour does not make: {line}"
            );
        }
        previous = line;
    }
}

/// The statuses the script's steps state, in order (`call 201 …`).
fn stated_statuses(script: &str) -> Vec<u16> {
    script
        .split("call ")
        .skip(1)
        .filter_map(|rest| rest.get(..4))
        .filter(|s| s.ends_with(' '))
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

async fn the_tour_runs_as_written(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let server = ServerProcess::start(&env).await.expect("the server starts");
    let run = tokio::process::Command::new("bash")
        .arg(repo().join("docs/tour.sh"))
        .current_dir(env.dir.path())
        .env("URL", &server.base)
        .env("TOKEN", env.token())
        .env("EVENTVAULT", binary())
        // The binary's commands open the server's databases.
        .env("EVENTVAULT_DATABASE_URL", &env.database_url)
        .env("EVENTVAULT_KEYSTORE_URL", &env.keystore_url)
        .env("EVENTVAULT_MASTER_KEY_FILE", env.master_key_file())
        .env("EVENTVAULT_POLICIES_DIR", policies_dir())
        .env_remove("EVENTVAULT_MASTER_KEY")
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the tour ends within 2 minutes")
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Its stderr (statuses, the binary's logs) is held to the log rules;
    // its stdout holds the answers, personal data included.
    append_to_log(&stderr);
    assert!(out.status.success(), "the tour failed:\n{stderr}");

    // Every step ran and answered the status it states.
    let answered: Vec<u16> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("HTTP "))
        .map(|s| s.parse().unwrap())
        .collect();
    let stated = stated_statuses(&script());
    assert!(stated.len() >= 25, "{stated:?}");
    assert_eq!(answered, stated, "{stderr}");
    // The first and the last `audit verify` print (the second is read by the tour).
    assert_eq!(stdout.matches("audit log intact").count(), 2, "{stdout}");

    // And the store holds what the tour did.
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let page: Value = app.read("accounts-ACC-1", "").await.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    let amounts: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["amount"].as_str().unwrap())
        .collect();
    assert_eq!(
        amounts,
        [
            "125.50",
            "20.00",
            "12345678901234567890.000000000000000001",
            "0.10"
        ]
    );
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["personal_data"].as_str().unwrap())
        .collect();
    // The withdrawal has no personal field.
    assert_eq!(states, ["erased", "none", "erased", "decrypted"]);
    let r = app
        .client
        .get(format!("{}/streams/accounts-ACC-1/snapshot", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let snapshot: Value = r.json().await.unwrap();
    assert_eq!(snapshot["version"], 3);
    assert_eq!(snapshot["personal_data"], "erased");
    let reads = app
        .audit_records("principal=support&action=stream.read&outcome=ok")
        .await;
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0]["purpose"], "complaint 4711");
    assert!(server.terminate().await.success());
}
