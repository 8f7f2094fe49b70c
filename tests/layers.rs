//! The layering ARCHITECTURE.md promises, checked on the source: which top-level module may
//! name which (`crate::X` paths and `use` lines, `super::` resolved), and no import circles —
//! neither between top-level modules nor between the files of one module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules each one must not name (ARCHITECTURE.md, "Layers").
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "runtime", "lora", "adapters", "engine", "server", "cli", "train", "generate",
        ],
    ),
    (
        "quant",
        &[
            "model", "lora", "runtime", "adapters", "engine", "server", "cli", "train",
        ],
    ),
    (
        "lora",
        &["runtime", "adapters", "engine", "server", "cli", "train"],
    ),
    (
        "runtime",
        &[
            "adapters", "engine", "server", "cli", "train", "generate", "tokenize",
        ],
    ),
    ("engine", &["server", "cli", "train"]),
    ("adapters", &["runtime", "engine", "server", "cli", "train"]),
    ("server", &["cli", "train"]),
    ("loadgen", &["server", "engine", "runtime", "train"]),
    ("train", &["server", "cli", "engine"]),
    ("generate", &["server", "cli", "engine"]),
];

/// Sub-modules that must not name each other (per-device code stays apart).
const APART: &[(&str, &str)] = &[("runtime::cpu", "runtime::cuda")];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/runtime/cpu/fast.rs` → `["runtime", "cpu", "fast"]`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The paths at the start of `rest` (after `crate::` or `super::`): `a::b::c`, or one per item
/// of a brace list (`a::{b, c::d}` → `a::b`, `a::c`).
fn expand(mut rest: &str) -> Vec<Vec<String>> {
    let mut segs = Vec::new();
    loop {
        if let Some(inner) = rest.strip_prefix('{') {
            let inner = inner.split('}').next().unwrap_or("");
            return inner
                .split(',')
                .map(|item| ident(item.trim()))
                .filter(|i| !i.is_empty())
                .map(|i| {
                    let mut p = segs.clone();
                    p.push(i);
                    p
                })
                .collect();
        }
        let id = ident(rest);
        if id.is_empty() {
            return vec![segs];
        }
        rest = &rest[id.len()..];
        segs.push(id);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => return vec![segs],
        }
    }
}

/// Every module path a file names: `crate::a::b`, and `super::x` resolved against the file's
/// module (`use super::{x, y}` gives both). Comments are skipped.
fn named_paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (prefix, base) in [
            ("crate::", Vec::new()),
            ("super::", module[..module.len().saturating_sub(1)].to_vec()),
        ] {
            let mut rest = code;
            while let Some(i) = rest.find(prefix) {
                // `a_super::` or `xcrate::` are other words.
                let before = rest[..i].chars().last();
                rest = &rest[i + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let heads = expand(rest);
                for h in heads {
                    let mut p = base.clone();
                    p.extend(h);
                    out.push(p);
                }
            }
        }
    }
    out
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

struct Source {
    module: Vec<String>,
    file: PathBuf,
    named: Vec<Vec<String>>,
}

fn sources() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let module = module_of(&src, &file);
            let text = std::fs::read_to_string(&file).unwrap();
            let named = named_paths(&module, &text);
            Source {
                module,
                file,
                named,
            }
        })
        .collect()
}

#[test]
fn no_layer_names_a_module_it_must_not_know() {
    let mut violations = Vec::new();
    for s in sources() {
        let Some(top) = s.module.first() else {
            continue;
        };
        let here = s.module.join("::");
        for p in &s.named {
            let Some(target) = p.first() else { continue };
            if let Some((_, banned)) = FORBIDDEN.iter().find(|(m, _)| m == top) {
                if banned.contains(&target.as_str()) {
                    violations.push(format!("{} names {}", s.file.display(), p.join("::")));
                }
            }
            let named = p.join("::");
            for (a, b) in APART {
                for (x, y) in [(a, b), (b, a)] {
                    if here.starts_with(x) && named.starts_with(y) {
                        violations.push(format!("{} names {named}", s.file.display()));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_import_circles_between_modules_or_between_files_of_one_module() {
    let sources = sources();
    // Top level: `a` → `b` when a file of `a` names `crate::b`.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Inside one module: child file `a::x` → sibling `a::y` (the parent's mod.rs re-exports
    // are not edges of their own).
    let mut inner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &sources {
        let Some(t) = s.module.first() else { continue };
        for p in &s.named {
            let Some(target) = p.first() else { continue };
            if target != t {
                top.entry(t.clone()).or_default().insert(target.clone());
            } else if s.module.len() >= 2 && p.len() >= 2 && p[1] != s.module[1] {
                inner
                    .entry(s.module[..2].join("::"))
                    .or_default()
                    .insert(p[..2].join("::"));
            }
        }
    }
    // The binary's `main` and the library root wire everything: not part of the layering.
    top.remove("");
    if let Some(c) = find_cycle(&top) {
        panic!("import circle between modules: {}", c.join(" → "));
    }
    if let Some(c) = find_cycle(&inner) {
        panic!("import circle between files: {}", c.join(" → "));
    }
}

#[test]
fn the_checker_sees_paths_and_circles() {
    let m = vec!["runtime".to_string(), "cpu".to_string(), "fast".to_string()];
    let named = named_paths(
        &m,
        "use super::kernels::{self, X};\nuse crate::model::{Llama, Proj};\n// crate::server\nlet a = crate::lora::LoraPair;\nuse super::{a, b::c};",
    );
    let flat: Vec<String> = named.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        flat,
        [
            "runtime::cpu::kernels::self",
            "runtime::cpu::kernels::X",
            "model::Llama",
            "model::Proj",
            "lora::LoraPair",
            "runtime::cpu::a",
            "runtime::cpu::b"
        ]
    );
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert!(find_cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}
