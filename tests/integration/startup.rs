//! Starting and stopping as an operator would: the binary, its first-start
//! token, the principal commands, bad policies, graceful shutdown.

use std::sync::Arc;

use reqwest::StatusCode;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, batch, command, command_with_policies, deposit,
};

both_backends!(
    first_start_prints_one_admin_token_and_sigterm_stops_cleanly,
    principal_commands_add_list_and_remove,
    a_bad_policy_stops_the_start_naming_file_and_line,
    shutdown_finishes_in_flight_appends,
);

async fn first_start_prints_one_admin_token_and_sigterm_stops_cleanly(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let server = ServerProcess::start(&env).await.expect("starts");
    let token = server.stdout_lines.last().expect("printed a token").clone();
    // The token is the last line before the listening address.
    assert!(token.starts_with("evt_"), "{:?}", server.stdout_lines);
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            client
                .get(format!("{}{path}", server.base))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    let r = client
        .post(format!("{}/streams/s/events", server.base))
        .bearer_auth(&token)
        .json(&batch(vec![deposit(Uuid::new_v4(), "c", "1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(server.terminate().await.success());

    let again = ServerProcess::start(&env).await.expect("restarts");
    assert!(
        again.stdout_lines.iter().all(|l| !l.contains("evt_")),
        "the token is printed only once"
    );
    assert!(again.terminate().await.success());
}

async fn principal_commands_add_list_and_remove(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let server = ServerProcess::start(&env).await.expect("starts");
    let out = command(
        &env,
        &[
            "principal",
            "add",
            "teller",
            "--role",
            "service",
            "--role",
            "support",
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().last().unwrap().to_owned();
    assert!(token.starts_with("evt_"), "{stdout}");

    let app = TestApp::client_for(env.clone(), server.base.clone());
    let r = app
        .client
        .get(format!("{}/events", server.base))
        .bearer_auth(&token)
        .header("X-Purpose", "account review")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let list = command(&env, &["principal", "list"])
        .output()
        .await
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    assert!(
        list.contains("teller\tservice,support") && list.contains("admin\tadmin"),
        "{list}"
    );
    assert!(!list.contains("evt_"), "list never prints tokens");

    let dup = command(&env, &["principal", "add", "teller", "--role", "service"])
        .output()
        .await
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    let bad_role = command(&env, &["principal", "add", "x", "--role", "wizard"])
        .output()
        .await
        .unwrap();
    assert!(!bad_role.status.success());
    let msg = String::from_utf8_lossy(&bad_role.stderr);
    assert!(msg.contains("wizard") && msg.contains("service"), "{msg}");

    let rm = command(&env, &["principal", "remove", "teller"])
        .output()
        .await
        .unwrap();
    assert!(rm.status.success());
    let list = String::from_utf8(
        command(&env, &["principal", "list"])
            .output()
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains("teller"));
    let rm = command(&env, &["principal", "remove", "teller"])
        .output()
        .await
        .unwrap();
    assert!(!rm.status.success());
    assert!(server.terminate().await.success());
}

async fn a_bad_policy_stops_the_start_naming_file_and_line(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        crate::common::policies_dir().join("roles.toml"),
        dir.path().join("roles.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("classification.toml"),
        "[types.MoneyDeposited]\nclear = [\"amount\"\n",
    )
    .unwrap();
    let out = command_with_policies(&env, dir.path(), &["serve", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("classification.toml") && err.contains("line 2"),
        "{err}"
    );
}

async fn shutdown_finishes_in_flight_appends(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let first_done = Arc::new(Notify::new());
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (app, first_done) = (app.clone(), first_done.clone());
            tokio::spawn(async move {
                let id = Uuid::new_v4();
                let r = app
                    .client
                    .post(format!("{}/streams/s{}/events", app.base, i % 10))
                    .bearer_auth(app.token())
                    .json(&batch(vec![deposit(id, "c", "1")]))
                    .send()
                    .await;
                first_done.notify_one();
                (id, r.map(|r| r.status()))
            })
        })
        .collect();
    // Shut down while the other appends are in flight.
    first_done.notified().await;
    let env = app.stop().await;
    let mut acknowledged = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, Ok(status)) => {
                assert_eq!(
                    status,
                    StatusCode::CREATED,
                    "an append the server took must finish, not fail"
                );
                acknowledged.push(id.to_string());
            }
            // Not accepted: the listener had closed. The client knows it failed.
            (_, Err(_)) => {}
        }
    }
    assert!(!acknowledged.is_empty());
    let app = TestApp::start(env).await;
    let stored: Vec<String> = app
        .whole_log()
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged append {id} was lost");
    }
}
