//! `--format` of `sbx ls` and `sbx inspect`: a field list (`id,name,state`) or a template in the
//! spirit of Go's (`{{.id}} {{.state}}`), applied to a sandbox's JSON as `--json` prints it.
//!
//! Fields are the JSON keys of a sandbox, case-insensitive (`{{.ID}}` works as in Docker), with
//! dots for nested ones (`spec.command`, `network.ports`). Strings print as they are, arrays of
//! strings joined by spaces, null or missing values as nothing, anything else as compact JSON.
//! A field list prints the values tab-separated; a template prints its text with each `{{.f}}`
//! replaced, and `\t` and `\n` written in it become a tab and a newline.

use serde_json::Value;

/// Top-level fields the daemon leaves out of a sandbox's JSON when they have no value.
const OMITTED_WHEN_EMPTY: [&str; 2] = ["init_pid", "host_uid"];

/// A parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `id,name,state`: the fields, tab-separated.
    Fields(Vec<Vec<String>>),
    /// `{{.id}}: {{.state}}`: text pieces and fields.
    Template(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Field(Vec<String>),
}

/// A field path: `.id`, `id`, `spec.command`.
fn path(field: &str) -> Result<Vec<String>, String> {
    let field = field.trim();
    let field = field.strip_prefix('.').unwrap_or(field);
    let parts: Vec<String> = field.split('.').map(str::to_ascii_lowercase).collect();
    if parts.iter().any(|p| {
        p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        return Err(format!(
            "--format: bad field {field:?} (expected names like id, state, spec.command)"
        ));
    }
    Ok(parts)
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        if !text.contains("{{") {
            let fields = text.split(',').map(path).collect::<Result<_, _>>()?;
            return Ok(Format::Fields(fields));
        }
        let text = text.replace("\\t", "\t").replace("\\n", "\n");
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| "--format: `{{` without a closing `}}`".to_owned())?;
            let field = after[..end].trim();
            if !field.starts_with('.') {
                return Err(format!(
                    "--format: {{{{{field}}}}} is not a field; write {{{{.name}}}}"
                ));
            }
            pieces.push(Piece::Field(path(field)?));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Format::Template(pieces))
    }

    /// The formatted line of one sandbox (as JSON); an unknown top-level field is an error.
    pub fn render(&self, item: &Value) -> Result<String, String> {
        match self {
            Format::Fields(fields) => Ok(fields
                .iter()
                .map(|f| lookup(item, f))
                .collect::<Result<Vec<_>, _>>()?
                .join("\t")),
            Format::Template(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => out.push_str(text),
                        Piece::Field(f) => out.push_str(&lookup(item, f)?),
                    }
                }
                Ok(out)
            }
        }
    }
}

fn lookup(item: &Value, path: &[String]) -> Result<String, String> {
    let Some(object) = item.as_object() else {
        return Ok(String::new());
    };
    let first = &path[0];
    let Some(mut value) = object.get(first) else {
        if OMITTED_WHEN_EMPTY.contains(&first.as_str()) {
            return Ok(String::new());
        }
        let mut known: Vec<&str> = object.keys().map(String::as_str).collect();
        known.extend(OMITTED_WHEN_EMPTY);
        known.sort_unstable();
        known.dedup();
        return Err(format!(
            "--format: no field {first:?} (fields: {})",
            known.join(", ")
        ));
    };
    for part in &path[1..] {
        match value.get(part.as_str()) {
            Some(v) => value = v,
            None => return Ok(String::new()),
        }
    }
    Ok(text(value))
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item() -> Value {
        json!({
            "id": "0123", "name": null, "state": "running", "exit_code": 3,
            "spec": { "command": ["sh", "-c", "x"], "limits": {} },
            "labels": { "a": "b" },
        })
    }

    fn render(format: &str) -> Result<String, String> {
        Format::parse(format)?.render(&item())
    }

    #[test]
    fn field_lists_are_tab_separated() {
        assert_eq!(render("id,state"), Ok("0123\trunning".into()));
        assert_eq!(render("ID, .State"), Ok("0123\trunning".into()));
        assert_eq!(render("name,exit_code"), Ok("\t3".into()));
        assert_eq!(render("spec.command"), Ok("sh -c x".into()));
        assert_eq!(render("labels"), Ok(r#"{"a":"b"}"#.into()));
        assert_eq!(render("spec.cwd,init_pid"), Ok("\t".into()));
    }

    #[test]
    fn templates_replace_fields() {
        assert_eq!(
            render("{{.id}} is {{ .State }}"),
            Ok("0123 is running".into())
        );
        assert_eq!(render(r"{{.id}}\t{{.exit_code}}"), Ok("0123\t3".into()));
        assert_eq!(render("[{{.spec.command}}]"), Ok("[sh -c x]".into()));
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(render("nosuch")
            .unwrap_err()
            .contains("no field \"nosuch\""));
        assert!(Format::parse("{{.id").is_err());
        assert!(Format::parse("{{id}}").is_err());
        assert!(Format::parse("id,,state").is_err());
        assert!(Format::parse("").is_err());
        assert!(Format::parse("a b").is_err());
    }
}
