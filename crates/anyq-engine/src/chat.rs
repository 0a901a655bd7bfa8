//! Chat templates: the Jinja templates Hugging Face tokenizers (and GGUF files, under
//! `tokenizer.chat_template`) carry, rendered with minijinja the way transformers'
//! `apply_chat_template` renders them.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// ChatML, for models that ship without a template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an error naming its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // transformers compiles templates with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string/dict/list methods (.strip(), .startswith(), .items(), ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| anyhow!("chat template: {e}"))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The prompt text for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> anyhow::Result<String> {
        let template = self.env.get_template(NAME).map_err(|e| anyhow!("chat template: {e}"))?;
        template
            .render(context! {
                messages => Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| anyhow!("rendering chat template: {e}"))
    }
}

/// Templates call this to reject input (e.g. roles out of order); the message becomes the error.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The current time formatted like Python's `datetime.now().strftime(format)`, in UTC.
pub fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
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
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// `strftime` for a Unix time in UTC, with the directives chat templates use; others are kept as
/// written.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                write!(out, "{day}")
            }
            Some('B') => write!(out, "{}", MONTHS[month as usize - 1]),
            Some('b') | Some('h') => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it (Python's `json.dumps`: `", "`/`": "` separators,
/// non-ASCII kept, optional `indent`), not minijinja's HTML-safe compact form.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    // Accepted for compatibility; keys are always sorted and non-ASCII always kept.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_json(&mut out, &json, indent, 0);
    Ok(Value::from(out))
}

fn write_json(out: &mut String, v: &serde_json::Value, indent: Option<usize>, level: usize) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&J::String(key.clone()).to_string());
                out.push_str(": ");
                write_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are a pirate."),
            ChatMessage::new("user", "What is the capital of France?"),
        ]
    }

    fn repo_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// SmolLM2's template, read from the real GGUF's `tokenizer.chat_template`.
    fn smollm2_template() -> String {
        let assets = std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
        let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.exists(), "{} is missing: run scripts/install-assets", path.display());
        let file = anyq_models::loader::gguf::GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        file.metadata.str("tokenizer.chat_template").unwrap().expect("tokenizer.chat_template").to_string()
    }

    #[test]
    fn smollm2_template_renders_chatml() {
        let template = ChatTemplate::new(&smollm2_template(), "<|im_start|>", "<|im_end|>").unwrap();
        let body = "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
        assert_eq!(template.render(&conversation(), false).unwrap(), body);
        assert_eq!(template.render(&conversation(), true).unwrap(), format!("{body}<|im_start|>assistant\n"));
        // Without a system message the template supplies its own.
        let user_only = template.render(&conversation()[1..], true).unwrap();
        assert_eq!(
            user_only,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // The fallback template agrees on conversations that have a system message.
        let chatml = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
        assert_eq!(chatml.render(&conversation(), true).unwrap(), template.render(&conversation(), true).unwrap());
    }

    #[test]
    fn matches_transformers_rendering() {
        // Rendered by transformers' apply_chat_template, see scripts/reference_fixtures.py.
        let path = repo_root().join("tests/fixtures/smollm2_reference.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate it with scripts/make-fixtures)", path.display()));
        let f: serde_json::Value = serde_json::from_str(&text).unwrap();
        let template = ChatTemplate::new(f["chat_template"].as_str().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
        let expected = f["chat_rendered"].as_str().unwrap();
        let messages = [ChatMessage::new("user", "What is the capital of France?")];
        assert_eq!(template.render(&messages, true).unwrap(), expected);
    }

    #[test]
    fn raise_exception_becomes_the_error() {
        let source = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let err = template.render(&conversation(), false).unwrap_err().to_string();
        assert!(err.contains("System role not supported"), "{err}");
        assert_eq!(template.render(&conversation()[1..], false).unwrap(), "What is the capital of France?");
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in ["{% for m in messages %}{{ m.content }}", "{{ messages[0] }", "{% if %}x{% endif %}"] {
            let err = ChatTemplate::new(bad, "", "").err().unwrap_or_else(|| panic!("{bad:?} compiled"));
            assert!(err.to_string().contains("syntax error"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn python_methods_tokens_and_block_trimming() {
        let source = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.content.strip().startswith('What') %}\n[{{ m.role.upper() }}] {{ m.content.split()[-1] }}\n    {% endif %}\n{% endfor %}\n{{ eos_token }}";
        let mut messages = conversation();
        messages[1].content = "  What a day  ".into();
        let out = ChatTemplate::new(source, "<s>", "</s>").unwrap().render(&messages, false).unwrap();
        // trim_blocks/lstrip_blocks (as transformers sets them) drop the lines holding block tags.
        assert_eq!(out, "<s>\n[USER] day\n</s>");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let source = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ 'é<' | tojson }}";
        let out = ChatTemplate::new(source, "", "").unwrap().render(&[ChatMessage::new("user", "hi")], false).unwrap();
        assert_eq!(out, "{\"content\": \"hi\", \"role\": \"user\"}|[\n  {\n    \"content\": \"hi\",\n    \"role\": \"user\"\n  }\n]|\"é<\"");
    }

    #[test]
    fn strftime_formats_utc_dates() {
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %A %j", 0), "1970-01-01 00:00:00 Thursday 001");
        // 1700000000 = Tue 14 Nov 2023 22:13:20 UTC
        assert_eq!(strftime("%d %b %Y, %a %I:%M %p %%", 1_700_000_000), "14 Nov 2023, Tue 10:13 PM %");
        assert_eq!(strftime("%B %-d, %y (%j)", 951_782_400), "February 29, 00 (060)");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap().render(&[], false).unwrap();
        assert!(now.parse::<i32>().is_ok_and(|y| y >= 2024), "{now}");
    }
}
