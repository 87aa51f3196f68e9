//! Concurrency: optimistic conflicts, many writers on one stream, a reader
//! following the log during writes, key creation races, two processes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, ServerProcess, TestApp, TestEnv, batch, deposit};

both_backends!(
    concurrent_no_stream_appends_have_one_winner,
    fifty_concurrent_writers_leave_no_gap,
    a_reader_following_the_log_never_misses_an_event,
    racing_requests_create_one_key_per_subject,
    two_processes_share_one_database,
);

/// Asserts that `log` is positions 1..=n without gap and that every stream's
/// versions are 1..=m without gap or duplicate.
#[track_caller]
pub fn assert_gapless(log: &[Value]) {
    let positions: Vec<u64> = log
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "global log has a gap or a duplicate"
    );
    let mut per_stream: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in log {
        per_stream
            .entry(e["stream_id"].as_str().unwrap())
            .or_default()
            .push(e["version"].as_u64().unwrap());
    }
    for (s, v) in per_stream {
        assert_eq!(
            v,
            (1..=v.len() as u64).collect::<Vec<_>>(),
            "stream {s} has a gap or a duplicate"
        );
    }
}

async fn concurrent_no_stream_appends_have_one_winner(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let r = app
                    .append(
                        "contested",
                        Some("no-stream"),
                        &batch(vec![deposit(Uuid::new_v4(), "c", "1")]),
                    )
                    .await;
                let status = r.status();
                (status, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => assert_eq!(body["current_version"], 1),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(app.whole_log().await.len(), 1);
}

async fn fifty_concurrent_writers_leave_no_gap(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let body = batch(vec![deposit(Uuid::new_v4(), &format!("c{i}"), "1")]);
                let r = app.append("busy", None, &body).await;
                assert_eq!(r.status(), StatusCode::CREATED);
                r.json::<Value>().await.unwrap()["first_version"]
                    .as_u64()
                    .unwrap()
            })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=50).collect::<Vec<_>>());
    let page: Value = app.read("busy", "limit=1000").await.json().await.unwrap();
    assert_eq!(page["current_version"], 50);
    assert_gapless(&app.whole_log().await);
}

async fn a_reader_following_the_log_never_misses_an_event(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let acked = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (app, acked) = (app.clone(), acked.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..25 {
                    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
                    let body = batch(vec![
                        deposit(a, &format!("w{w}"), "1"),
                        deposit(b, &format!("w{w}"), "2"),
                    ]);
                    let r = app
                        .append(&format!("stream-{}", (w + i) % 5), None, &body)
                        .await;
                    assert_eq!(r.status(), StatusCode::CREATED);
                    acked.fetch_add(2, Ordering::SeqCst);
                    ids.extend([a, b]);
                }
                ids
            })
        })
        .collect();
    let reader = {
        let (app, acked, done) = (app.clone(), acked.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen: Vec<Value> = Vec::new();
            let mut after = 0;
            // Follow until every writer has finished and every acknowledged
            // event has been seen.
            while !(done.load(Ordering::SeqCst) && seen.len() >= acked.load(Ordering::SeqCst)) {
                let page: Value = app
                    .log(&format!("after={after}&limit=7"))
                    .await
                    .json()
                    .await
                    .unwrap();
                let events = page["events"].as_array().unwrap();
                if events.is_empty() {
                    tokio::task::yield_now().await;
                }
                seen.extend(events.iter().cloned());
                after = page["next"].as_u64().unwrap();
            }
            seen
        })
    };
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap().into_iter().map(|u| u.to_string()));
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), 400);
    assert_gapless(&seen);
    let seen_ids: HashSet<String> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen_ids, written);
}

async fn racing_requests_create_one_key_per_subject(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let r = app
                    .append(
                        &format!("s{i}"),
                        None,
                        &batch(vec![deposit(Uuid::new_v4(), "new-subject", "1")]),
                    )
                    .await;
                assert_eq!(r.status(), StatusCode::CREATED);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let keystore = crate::at_rest::keystore_db(&app.env).await;
    assert_eq!(
        crate::at_rest::key_ids_of(&keystore, "new-subject")
            .await
            .len(),
        1
    );
    let db = crate::at_rest::events_db(&app.env).await;
    let used = crate::at_rest::distinct_key_ids(&db).await;
    assert_eq!(used.len(), 1, "every event sealed under the one key");
    assert!(
        app.whole_log()
            .await
            .iter()
            .all(|e| e["personal_data"] == "decrypted")
    );
}

async fn two_processes_share_one_database(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let first = ServerProcess::start(&env)
        .await
        .expect("first process starts");
    let second = ServerProcess::start(&env)
        .await
        .expect("second process starts");
    assert!(
        second.stdout_lines.is_empty(),
        "only the first start prints a token"
    );
    let token = env.token();
    let client = reqwest::Client::new();
    let bases = [first.base.clone(), second.base.clone()];
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let (client, base, token) = (client.clone(), bases[w % 2].clone(), token.clone());
            tokio::spawn(async move {
                for i in 0..20 {
                    let body = batch(vec![
                        deposit(Uuid::new_v4(), "c", "1"),
                        deposit(Uuid::new_v4(), "d", "2"),
                    ]);
                    let r = client
                        .post(format!("{base}/streams/shared-{}/events", i % 3))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(
                        r.status(),
                        StatusCode::CREATED,
                        "{}",
                        r.text().await.unwrap()
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(first.terminate().await.success());
    // Read through the second process: it sees what the first wrote.
    let app = TestApp::client_for(env.clone(), second.base.clone());
    let log = app.whole_log().await;
    assert_eq!(log.len(), 320);
    assert_gapless(&log);
    assert!(second.terminate().await.success());
}
