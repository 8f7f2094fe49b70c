//! Chat templates, rendered with minijinja the way Hugging Face `transformers` renders them.
//!
//! `transformers` renders `tokenizer.chat_template` with Jinja2 (`trim_blocks=True`,
//! `lstrip_blocks=True`, the loop-controls extension) and passes `messages`,
//! `add_generation_prompt` and the special-token strings (`bos_token`, `eos_token`, ...). It adds
//! the functions `raise_exception(msg)` and `strftime_now(fmt)` and a `tojson` filter that calls
//! Python's `json.dumps` (no HTML escaping, non-ASCII kept). Templates also call Python string
//! methods (`.strip()`, `.startswith()`, ...), which minijinja-contrib's pycompat provides.
//!
//! `strftime_now` uses UTC (no time-zone database is linked in).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::TextTokenizer;

/// One chat turn: `role` is "system", "user", "assistant" (or whatever the template knows).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A message as the template sees it: a mapping with the keys in Python's order.
#[derive(Debug)]
struct MessageValue(ChatMessage);

impl Object for MessageValue {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

impl TextTokenizer {
    /// Renders the chat template over `messages`, as `transformers`' `apply_chat_template(...,
    /// tokenize=False)` does. Encode the result with `add_special_tokens = false`: the template
    /// already writes whatever special tokens the model expects.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("this model has no chat template; use --prompt"))?;
        let name = |id: Option<u32>| id.and_then(|id| self.tok.id_to_token(id));
        let specials = [
            ("bos_token", name(self.bos_id)),
            ("eos_token", name(self.eos_ids.first().copied())),
            ("pad_token", name(self.pad_id)),
            ("unk_token", name(self.unk_id)),
        ];
        render(template, messages, add_generation_prompt, &specials)
    }
}

/// Renders `template`; special tokens that are `None` stay undefined, as in `transformers`.
fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    specials: &[(&str, Option<String>)],
) -> Result<String> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| anyhow!("cannot configure the template engine: {e}"))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    let raised = Arc::new(Mutex::new(None::<String>));
    let raised_in = Arc::clone(&raised);
    env.add_function(
        "raise_exception",
        move |msg: String| -> Result<Value, Error> {
            if let Ok(mut slot) = raised_in.lock() {
                *slot = Some(msg.clone());
            }
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Value::from(strftime_utc(&fmt, i64::try_from(now).unwrap_or(0)))
    });
    env.add_filter("tojson", tojson);

    let compiled = env
        .template_from_str(template)
        .map_err(|e| template_error("the chat template does not parse", &e, template))?;
    let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
        (
            "messages",
            Value::from(
                messages
                    .iter()
                    .map(|m| Value::from_object(MessageValue(m.clone())))
                    .collect::<Vec<_>>(),
            ),
        ),
        ("add_generation_prompt", Value::from(add_generation_prompt)),
    ]);
    for (key, value) in specials {
        if let Some(v) = value {
            ctx.insert(key, Value::from(v.as_str()));
        }
    }
    compiled.render(Value::from(ctx)).map_err(|e| {
        if let Some(msg) = raised.lock().ok().and_then(|mut slot| slot.take()) {
            return anyhow!("the chat template refused these messages: {msg}");
        }
        template_error("cannot render the chat template", &e, template)
    })
}

/// An error message with minijinja's description and the template line it points at.
fn template_error(what: &str, e: &Error, template: &str) -> anyhow::Error {
    let mut msg = format!("{what}: {}", e.kind());
    if let Some(detail) = e.detail() {
        msg.push_str(&format!(": {detail}"));
    }
    if let Some(line) = e.line() {
        let text: String = template
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim()
            .chars()
            .take(160)
            .collect();
        msg.push_str(&format!(" (template line {line}: {text})"));
    }
    anyhow!(msg)
}

/// `tojson` as in `transformers`: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`, without HTML escaping.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(n) => Some(n),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0, sort_keys)?;
    if ensure_ascii {
        out = out
            .encode_utf16()
            .map(|u| {
                if u < 0x80 {
                    char::from(u as u8).to_string()
                } else {
                    format!("\\u{u:04x}")
                }
            })
            .collect();
    }
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    sort_keys: bool,
) -> Result<(), Error> {
    let json_err = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match (value.as_i64(), f64::try_from(value.clone())) {
            (Some(i), _) => out.push_str(&i.to_string()),
            (None, Ok(f)) if f.is_finite() => out.push_str(&format!("{f:?}")),
            (None, Ok(f)) if f.is_nan() => out.push_str("NaN"),
            (None, Ok(f)) => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
            (None, Err(_)) => out.push_str(&value.to_string()),
        },
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(s).map_err(|_| json_err("bad string"))?);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1, sort_keys)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let name = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                out.push_str(&serde_json::to_string(&name).map_err(|_| json_err("bad key"))?);
                out.push_str(": ");
                let item = value.get_item(key)?;
                write_json(out, &item, indent, depth + 1, sort_keys)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        other => {
            return Err(json_err(&format!(
                "cannot serialize a value of kind {other}"
            )))
        }
    }
    Ok(())
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// C `strftime` for a UTC time given as seconds since the epoch. Supports the common
/// conversions (`%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %h %F %T %D %R %Z %z %%`);
/// others are copied through unchanged.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = (1..month).map(|m| days_in_month(year, m)).sum::<i64>() + i64::from(day);
    let month_name = MONTHS[(month as usize).saturating_sub(1) % 12];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('R') => out.push_str(&format!("{hour:02}:{minute:02}")),
            Some('D') => out.push_str(&format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100))),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn days_in_month(year: i64, month: u32) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(template: &str, messages: &[ChatMessage], gen: bool) -> Result<String> {
        let specials = [("bos_token", Some("<s>".to_string())), ("eos_token", None)];
        render(template, messages, gen, &specials)
    }

    #[test]
    fn trims_blocks_like_transformers() -> Result<()> {
        let template = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let out = chat(
            template,
            &[
                ChatMessage::new("user", "hi"),
                ChatMessage::new("user", "yo"),
            ],
            false,
        )?;
        assert_eq!(out, "U:hi\nU:yo\n");
        Ok(())
    }

    #[test]
    fn passes_special_tokens_and_leaves_missing_ones_undefined() -> Result<()> {
        let out = chat(
            "{{ bos_token }}|{{ eos_token }}|{{ eos_token is defined }}",
            &[],
            false,
        )?;
        assert_eq!(out, "<s>||False", "booleans print as in Python");
        Ok(())
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() -> Result<()> {
        let template = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% if m.role.startswith('us') %}!{% endif %}{% endfor %}";
        let msgs = [
            ChatMessage::new("user", "  a "),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
        ];
        assert_eq!(chat(template, &msgs, false)?, "A!B");
        Ok(())
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let template = "{% if messages[0].role != 'system' %}{{ raise_exception('System first, please') }}{% endif %}";
        let err = chat(template, &[ChatMessage::new("user", "x")], false)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("System first, please"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_problem_and_line() {
        let err = chat("line one\n{% if x %}\nunclosed", &[], false)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("does not parse"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() -> Result<()> {
        let msgs = [ChatMessage::new("user", "<b>\"é\"\n")];
        let out = chat("{{ messages[0] | tojson }}", &msgs, false)?;
        assert_eq!(out, r#"{"role": "user", "content": "<b>\"é\"\n"}"#);
        let out = chat("{{ messages[0] | tojson(indent=2) }}", &msgs, false)?;
        assert_eq!(
            out,
            "{\n  \"role\": \"user\",\n  \"content\": \"<b>\\\"é\\\"\\n\"\n}"
        );
        let out = chat("{{ [1, 2.5, none, true] | tojson }}", &[], false)?;
        assert_eq!(out, "[1, 2.5, null, true]");
        Ok(())
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime_utc("%A %B %e %I%p %j %%", t),
            "Thursday February 29 01PM 060 %"
        );
        assert_eq!(strftime_utc("%F", 0), "1970-01-01");
        assert_eq!(strftime_utc("%a %F %T", -1), "Wed 1969-12-31 23:59:59");
    }
}
