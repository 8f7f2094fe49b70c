//! Starting the real `loraplex serve` binary on a free port for integration tests.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `loraplex serve --port 0 ARGS...`; waits for the "listening on" line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(super::bin())
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_remove("LORAPLEX_API_KEY")
            .env_remove("LORAPLEX_ADMIN_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "server did not start");
            let Some(Ok(line)) = lines.next() else {
                let status = child.wait().unwrap();
                panic!("server exited before listening: {status}");
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap().to_string();
                // Keep draining stdout so the server never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Server { child, url };
            }
        }
    }

    /// Sends SIGTERM and waits for the process; returns its exit status.
    /// The server process id (to sample its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// Runs tests/openai_client.py (the official `openai` package, from `.venv`) against this
    /// server for `base` and `adapter`; asserts it passed and returns what it printed.
    pub fn run_openai_client(&self, base: &str, adapter: &str) -> Value {
        self.run_python("openai_client.py", &[base, adapter])
    }

    /// Runs `tests/SCRIPT URL ARGS...` with the python that has the `openai` package (`.venv`,
    /// or `LORAPLEX_PYTHON`); asserts it passed and returns the JSON it printed.
    pub fn run_python(&self, script: &str, args: &[&str]) -> Value {
        let root = super::repo_root();
        let python = match std::env::var_os("LORAPLEX_PYTHON") {
            Some(p) => std::path::PathBuf::from(p),
            None => root.join(".venv/bin/python"),
        };
        assert!(
            python.exists(),
            "run scripts/test.sh once: it creates .venv with the openai package"
        );
        let out = Command::new(&python)
            .arg(root.join("tests").join(script))
            .arg(&self.url)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_with(path, body, None)
    }

    pub fn post_with(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let mut req = ureq::post(&format!("{}{path}", self.url)).timeout(Duration::from_secs(120));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        respond(req.send_string(&body.to_string()))
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        respond(
            ureq::post(&format!("{}{path}", self.url))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.url)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    /// A greedy chat answer of `model` to one user message (trimmed); panics unless 200.
    pub fn chat_answer(&self, model: &str, question: &str, max_tokens: usize) -> String {
        let (code, body) = self.post(
            "/v1/chat/completions",
            &serde_json::json!({"model": model, "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": question}]}),
        );
        assert_eq!(code, 200, "{body}");
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The answers of `n` greedy chat requests to `model` (`max_tokens` each, end-of-sequence
    /// ignored, request i asks about i), sent one at a time and then all at once from threads.
    pub fn answers_alone_and_together(
        &self,
        model: &str,
        n: usize,
        max_tokens: usize,
    ) -> (Vec<Value>, Vec<Value>) {
        let ask = |i: usize| {
            let b = serde_json::json!({"model": model, "max_tokens": max_tokens,
                "ignore_eos": true, "temperature": 0,
                "messages": [{"role": "user", "content": format!("tell me about {i}")}]});
            let (code, body) = self.post("/v1/chat/completions", &b);
            assert_eq!(code, 200, "{body}");
            body["choices"][0]["message"]["content"].clone()
        };
        let alone = (0..n).map(ask).collect();
        let together = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|i| s.spawn(move || ask(i))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (alone, together)
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        respond(ureq::delete(&format!("{}{path}", self.url)).call())
    }

    /// The value of a metric line that starts with `prefix` (summed over matches).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn respond(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(c, r)) => (c, r),
        Err(e) => panic!("transport error: {e}"),
    };
    let text = resp.into_string().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts an OpenAI error body with the given status.
pub fn assert_error(got: &(u16, Value), status: u16, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let e = &got.1["error"];
    assert!(
        e["message"].is_string() && e["type"].is_string(),
        "{what}: not an OpenAI error body: {}",
        got.1
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {}",
        got.1
    );
}
