//! The floors of `src/` (ARCHITECTURE.md, "Floors"): each room (a top-level file or
//! folder of `src/`) may import only rooms on lower floors, so no import runs back up
//! and no two rooms import each other. Inside `src/api/` no file imports, through any
//! chain, a file that imports it back (the handlers list nothing; `mod.rs` and
//! `openapi.rs` list the handlers). Read from the source text: `crate::room` paths
//! outside comments and outside `#[cfg(test)] mod tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Room → floor. A new room must be placed here (the test says so).
const FLOORS: &[(&str, u32)] = &[
    ("lib", 0),
    ("model", 0),
    ("metrics", 0),
    ("neumaier", 0),
    ("decimal", 0),
    ("origin", 0),
    ("lifecycle", 0),
    ("telemetry", 0),
    ("store", 1),
    ("cluster", 1),
    ("pipeline", 1),
    ("series", 1),
    ("queue", 2),
    ("config", 2),
    ("jobs", 3),
    ("csv", 4),
    ("stats", 4),
    ("api", 5),
    ("cli", 5),
    ("app", 6),
    ("main", 7),
];

/// Items of the crate root (`lib.rs`) that every room may name.
const ROOT_ITEMS: &[&str] = &["now_ms"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and its unit-test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string is rare in paths' neighbourhood; cutting there only
            // drops text, never invents an import.
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` (`crate::` or `super::`), including each
/// first segment of a `prefix{a, b::c}` group.
fn named_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn room_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn no_room_imports_a_room_on_its_own_floor_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut imports = 0;
    for file in &files {
        let room = room_of(&src, file);
        let Some(&floor) = floors.get(room.as_str()) else {
            wrong.push(format!("{room}: a room without a floor (add it to FLOORS)"));
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for named in named_after(&code, "crate::") {
            if named == room || ROOT_ITEMS.contains(&named.as_str()) {
                continue;
            }
            imports += 1;
            match floors.get(named.as_str()) {
                Some(&to) if to < floor => {}
                Some(&to) => wrong.push(format!(
                    "{} (floor {floor}) imports {named} (floor {to})",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{} names crate::{named}, neither a room nor a root item",
                    file.display()
                )),
            }
        }
    }
    assert!(imports > 50, "the imports were read ({imports})");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_file_of_the_api_imports_a_file_that_imports_it_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    // `super::X` names file X, or an item of `mod.rs`.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let mut deps = BTreeSet::new();
        if name == "mod" {
            for other in &names {
                if code.contains(&format!("{other}::")) && other != "mod" {
                    deps.insert(other.clone());
                }
            }
        } else {
            for named in named_after(&code, "super::")
                .into_iter()
                .chain(named_after(&code, "crate::api::"))
            {
                deps.insert(if names.contains(&named) {
                    named
                } else {
                    "mod".to_string()
                });
            }
        }
        deps.remove(&name);
        graph.insert(name, deps);
    }
    assert!(graph["openapi"].contains("v1"), "the graph was read");
    // Whatever each file reaches, through any chain.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(f) = todo.pop() {
            for d in graph.get(&f).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let circles: Vec<String> = graph
        .keys()
        .filter(|f| reach(f).contains(*f))
        .cloned()
        .collect();
    assert!(
        circles.is_empty(),
        "files of src/api that reach themselves: {circles:?}"
    );
}
