//! Every flag the README and docs/PERFORMANCE.md pass to the clients is one
//! they take: a command in the documentation that would fail on a renamed
//! or removed flag fails here first.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The `--flags` of every command line in `text` that runs `tool`, with the
/// lines a trailing `\` continues.
fn documented_flags(text: &str, tool: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(at) = line.find(tool) else { continue };
        let mut command = line[at + tool.len()..].to_owned();
        while command.trim_end().ends_with('\\') {
            let Some(next) = lines.next() else { break };
            command.push(' ');
            command.push_str(next);
        }
        // Shell only: a flag of the tool is a word of its own.
        for word in command.split_whitespace() {
            let word = word.trim_matches(|c| c == '`' || c == ',' || c == ')');
            if let Some(name) = word.strip_prefix("--") {
                let name = name.split('=').next().unwrap_or_default();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    flags.insert(format!("--{name}"));
                }
            }
        }
    }
    flags
}

fn help(bin: &str) -> String {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{bin} --help failed: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

fn check(tool: &str, bin: &str, at_least: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut documented = BTreeSet::new();
    for doc in ["README.md", "docs/PERFORMANCE.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("read the docs");
        documented.extend(documented_flags(&text, tool));
    }
    assert!(
        documented.len() >= at_least,
        "found only {documented:?} for {tool} in the docs"
    );
    let help = help(bin);
    let taken: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--"))
        .collect();
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|f| {
            f.as_str() != "--release" && f.as_str() != "--bin" && !taken.contains(f.as_str())
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "{tool} does not take {unknown:?}, which the docs pass it"
    );
}

#[test]
fn the_load_tool_takes_every_flag_the_docs_give_it() {
    check(
        "eventvault-bench",
        env!("CARGO_BIN_EXE_eventvault-bench"),
        10,
    );
}

#[test]
fn the_read_model_takes_every_flag_the_docs_give_it() {
    check(
        "eventvault-balances",
        env!("CARGO_BIN_EXE_eventvault-balances"),
        3,
    );
}
