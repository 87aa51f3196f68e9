//! Crashes lose nothing acknowledged: the real binary, killed with SIGKILL
//! at random moments while clients append (and while a forget or a master
//! key rotation runs), then restarted; what it acknowledged is there exactly
//! once, what it refused is not, nothing is there twice, versions and
//! positions have no gap, every event decrypts and the audit chain holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, ServerProcess, TestApp, TestEnv, batch, command, deposit, run_ok};

both_backends!(
    nothing_acknowledged_is_lost_across_twenty_kills,
    a_forget_or_a_rotation_killed_midway_is_completed,
);

const KILLS: usize = 20;
/// The longest a test waits for the service before it fails.
const PATIENCE: Duration = Duration::from_secs(30);
const STREAMS: usize = 5;
const CLIENTS: usize = 6;

/// xorshift64*: the seed is printed, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn seed() -> u64 {
    let seed = u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap()) | 1;
    eprintln!("crash seed: {seed}");
    seed
}

/// What became of one append request.
#[derive(Debug, Clone)]
enum Outcome {
    /// 201 or 200, with the answer.
    Acknowledged(Value),
    /// A 4xx: it must have written nothing.
    Refused,
    /// No answer (connection reset, timeout, 5xx): at most once.
    Unknown,
}

struct Sent {
    stream: String,
    /// Event id and amount, in order.
    events: Vec<(Uuid, String)>,
    outcome: Outcome,
}

/// Appends from `CLIENTS` tasks until the server stops answering; every
/// request and its outcome lands in `log`. One in six asks for a version the
/// stream cannot have, to be refused.
async fn drive(
    base: String,
    token: String,
    round: usize,
    log: Arc<Mutex<Vec<Sent>>>,
    answered: Arc<tokio::sync::watch::Sender<usize>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let answered = answered.clone();
            let (client, base, token, log) =
                (client.clone(), base.clone(), token.clone(), log.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let stream = format!("accounts-{}", (c + n) % STREAMS);
                    let size = 1 + (c + n) % 3;
                    let events: Vec<(Uuid, String)> = (0..size)
                        .map(|i| (Uuid::new_v4(), format!("{round}.{c}{n}{i}")))
                        .collect();
                    let body = batch(
                        events
                            .iter()
                            .map(|(id, amount)| deposit(*id, &format!("cust-{}", n % 7), amount))
                            .collect(),
                    );
                    let mut req = client
                        .post(format!("{base}/streams/{stream}/events"))
                        .bearer_auth(&token)
                        .json(&body);
                    if (c + n) % 6 == 5 {
                        req = req.header("Expected-Version", "999999999");
                    }
                    let (outcome, stop) = match req.send().await {
                        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                            Ok(v) => (Outcome::Acknowledged(v), false),
                            Err(_) => (Outcome::Unknown, true),
                        },
                        Ok(r) if r.status().is_client_error() => (Outcome::Refused, false),
                        Ok(_) | Err(_) => (Outcome::Unknown, true),
                    };
                    log.lock().unwrap().push(Sent {
                        stream,
                        events,
                        outcome,
                    });
                    answered.send_modify(|n| *n += 1);
                    if stop {
                        return;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn nothing_acknowledged_is_lost_across_twenty_kills(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let mut rng = Rng(seed());
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    for round in 0..KILLS {
        let mut server = ServerProcess::start(&env)
            .await
            .expect("the service starts");
        let answered = Arc::new(tokio::sync::watch::Sender::new(0usize));
        let mut progress = answered.subscribe();
        let driving = tokio::spawn(drive(
            server.base.clone(),
            env.token(),
            round,
            log.clone(),
            answered,
        ));
        // The kill lands after a random number of answers, with the other
        // clients' requests in flight.
        let target = 1 + rng.below(40) as usize;
        tokio::time::timeout(PATIENCE, progress.wait_for(|n| *n >= target))
            .await
            .expect("the clients got answers")
            .unwrap();
        server.child.start_kill().unwrap();
        server.child.wait().await.unwrap();
        driving.await.unwrap();
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let count = |f: fn(&Outcome) -> bool| log.iter().filter(|s| f(&s.outcome)).count();
    let acknowledged = count(|o| matches!(o, Outcome::Acknowledged(_)));
    eprintln!(
        "crash: {KILLS} kills, {} requests: {acknowledged} acknowledged, {} refused, {} unknown",
        log.len(),
        count(|o| matches!(o, Outcome::Refused)),
        count(|o| matches!(o, Outcome::Unknown)),
    );
    assert!(acknowledged > KILLS, "the run did some work");

    let server = ServerProcess::start(&env)
        .await
        .expect("the service starts");
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let all = app.whole_log().await;
    // The global log is gapless, and no event is there twice.
    let positions: Vec<u64> = all
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, (1..=all.len() as u64).collect::<Vec<_>>());
    let by_id: HashMap<Uuid, &Value> = all
        .iter()
        .map(|e| (e["id"].as_str().unwrap().parse().unwrap(), e))
        .collect();
    assert_eq!(by_id.len(), all.len(), "an event stored twice");
    // Every stream's versions are 1..n.
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &all {
        versions
            .entry(e["stream_id"].as_str().unwrap())
            .or_default()
            .push(e["version"].as_u64().unwrap());
    }
    for (stream, v) in &versions {
        assert_eq!(*v, (1..=v.len() as u64).collect::<Vec<_>>(), "{stream}");
    }
    // Every event still decrypts.
    assert!(all.iter().all(|e| e["personal_data"] == "decrypted"));
    let mut lost = 0;
    for sent in &log {
        let found: Vec<Option<&&Value>> = sent.events.iter().map(|(id, _)| by_id.get(id)).collect();
        match &sent.outcome {
            Outcome::Acknowledged(answer) => {
                let first = answer["first_version"].as_u64().unwrap();
                for (i, ((_, amount), e)) in sent.events.iter().zip(&found).enumerate() {
                    let Some(e) = e else {
                        lost += 1;
                        continue;
                    };
                    assert_eq!(e["stream_id"], sent.stream.as_str());
                    assert_eq!(e["version"], first + i as u64);
                    assert_eq!(e["data"]["amount"], amount.as_str());
                }
            }
            Outcome::Refused => assert!(
                found.iter().all(Option::is_none),
                "a refused append was written"
            ),
            // All or nothing: an append is atomic.
            Outcome::Unknown => assert!(
                found.iter().all(Option::is_some) || found.iter().all(Option::is_none),
                "half an append"
            ),
        }
    }
    assert_eq!(lost, 0, "acknowledged events lost");
    let (status, text) = app.get("/audit/verify", &env.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["ok"],
        true,
        "{text}"
    );
    server.terminate().await;
}

async fn a_forget_or_a_rotation_killed_midway_is_completed(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let mut rng = Rng(seed());
    let subjects: Vec<String> = (0..60).map(|i| format!("cust-{i}")).collect();
    {
        let server = ServerProcess::start(&env)
            .await
            .expect("the service starts");
        let app = TestApp::client_for(env.clone(), server.base.clone());
        for chunk in subjects.chunks(20) {
            app.append_ok(
                "accounts-1",
                &batch(
                    chunk
                        .iter()
                        .map(|s| deposit(Uuid::new_v4(), s, "1.00"))
                        .collect(),
                ),
            )
            .await;
        }
        server.terminate().await;
    }
    let dpo = env.add_principal("privacy", &["dpo"]).await;
    // Forgets of 30 subjects, the service killed while they run, three times.
    let forgotten: Vec<&String> = subjects.iter().take(30).collect();
    for round in 0..3 {
        let mut server = ServerProcess::start(&env)
            .await
            .expect("the service starts");
        let client = reqwest::Client::new();
        let (done, mut answers) = tokio::sync::mpsc::unbounded_channel();
        let calls: Vec<_> = forgotten
            .iter()
            .skip(round * 10)
            .take(10)
            .map(|s| {
                let url = format!("{}/subjects/{s}/forget", server.base);
                let (client, dpo, done) = (client.clone(), dpo.clone(), done.clone());
                tokio::spawn(async move {
                    let r = client.post(url).bearer_auth(dpo).send().await.ok();
                    let _ = done.send(());
                    r
                })
            })
            .collect();
        // Killed once a random number of them (maybe none) were answered:
        // the others are under way.
        for _ in 0..rng.below(9) {
            tokio::time::timeout(PATIENCE, answers.recv())
                .await
                .expect("a forget was answered");
        }
        server.child.start_kill().unwrap();
        server.child.wait().await.unwrap();
        for c in calls {
            let _ = c.await;
        }
    }
    // The next start completes every forget whose intent was recorded.
    let server = ServerProcess::start(&env)
        .await
        .expect("the service starts");
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let mut recorded = HashSet::new();
    for s in &forgotten {
        let (_, text) = app.get(&format!("/subjects/{s}"), &dpo).await;
        let state: Value = serde_json::from_str(&text).unwrap();
        if state["state"] == "forgotten" {
            recorded.insert(s.as_str());
        }
    }
    let page: Value = app
        .read("accounts-1", "limit=1000")
        .await
        .json()
        .await
        .unwrap();
    for e in page["events"].as_array().unwrap() {
        let subject = e["subject"].as_str().unwrap();
        let expected = if recorded.contains(subject) {
            "erased"
        } else {
            "decrypted"
        };
        assert_eq!(e["personal_data"], expected, "{subject}");
    }
    // Each completed forget left its `$subjects` event.
    let (_, text) = app
        .get("/streams/$subjects/events?limit=1000", &env.token())
        .await;
    let ledger: Value = serde_json::from_str(&text).unwrap();
    let announced: HashSet<&str> = ledger["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["subject"].as_str().unwrap())
        .collect();
    assert_eq!(announced, recorded, "every recorded forget was completed");
    eprintln!(
        "crash: {} of 30 forgets recorded before their kill and completed",
        recorded.len()
    );
    let ks = crate::at_rest::keystore_db(&env).await;
    for s in &recorded {
        assert!(
            crate::at_rest::key_ids_of(&ks, s).await.is_empty(),
            "{s} has a key"
        );
    }
    ks.close().await;
    server.terminate().await;

    // A master key rotation killed midway, three times, then run to its end.
    for _ in 0..3 {
        let mut child = command(&env, &["keys", "rotate-kek", "--batch-size", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed when its progress line reaches a random count (or it ends).
        let target = rng.below(30);
        let mut progress = child.stderr.take().unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        loop {
            use tokio::io::AsyncReadExt;
            let n = tokio::time::timeout(PATIENCE, progress.read(&mut buf))
                .await
                .expect("the rotation makes progress")
                .unwrap();
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            let done: u64 = seen
                .rsplit("re-wrapping data keys: ")
                .next()
                .and_then(|t| t.split('/').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if done >= target {
                break;
            }
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    run_ok(&env, &["keys", "rotate-kek", "--batch-size", "7"]).await;
    // Every data key is wrapped by the one master key left.
    let status = run_ok(&env, &["keys", "status"]).await;
    assert_eq!(status.lines().count(), 1, "{status}");
    let keys_left = subjects.len() - recorded.len();
    assert!(
        status.contains(&format!("{keys_left} data keys (configured)")),
        "{status}"
    );
    // And opens every remaining subject's events.
    let server = ServerProcess::start(&env)
        .await
        .expect("the service starts");
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let page: Value = app
        .read("accounts-1", "limit=1000")
        .await
        .json()
        .await
        .unwrap();
    let decrypted = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["personal_data"] == "decrypted")
        .count();
    assert_eq!(decrypted, keys_left);
    server.terminate().await;
}
