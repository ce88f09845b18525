//! Validation against Discord limits: messages, components, modals, commands.

use super::*;

pub(super) fn problem(path: &str, code: &'static str, message: String) -> Problem {
    Problem {
        path: path.to_string(),
        code,
        message,
    }
}

pub(super) fn check_len(out: &mut Vec<Problem>, path: &str, v: &Value, max: usize) -> usize {
    let n = v.as_str().map_or(0, |s| s.chars().count());
    if n > max {
        out.push(problem(
            path,
            "BASE_TYPE_MAX_LENGTH",
            format!("Must be {max} or fewer in length (got {n})."),
        ));
    }
    n
}

pub(super) fn check_count(out: &mut Vec<Problem>, path: &str, v: &Value, min: usize, max: usize) {
    let n = v.as_array().map_or(0, Vec::len);
    if n < min || n > max {
        out.push(problem(
            path,
            "BASE_TYPE_BAD_LENGTH",
            format!("Must be between {min} and {max} in length (got {n})."),
        ));
    }
}

/// Checks a message create/edit body (also `data` of interaction responses 4 and 7).
pub fn validate_message_body(body: &Value, creating: bool, has_files: bool) -> Vec<String> {
    validate_message(body, creating, has_files)
        .into_iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect()
}

pub(super) fn validate_message(body: &Value, creating: bool, has_files: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    check_len(&mut out, "content", &body["content"], limits::CONTENT);
    let embeds = &body["embeds"];
    if let Some(list) = embeds.as_array() {
        check_count(&mut out, "embeds", embeds, 0, limits::EMBEDS);
        let mut total = 0;
        for (i, e) in list.iter().enumerate() {
            let p = |k: &str| format!("embeds.{i}.{k}");
            total += check_len(&mut out, &p("title"), &e["title"], limits::EMBED_TITLE);
            total += check_len(
                &mut out,
                &p("description"),
                &e["description"],
                limits::EMBED_DESCRIPTION,
            );
            total += check_len(
                &mut out,
                &p("footer.text"),
                &e["footer"]["text"],
                limits::EMBED_FOOTER,
            );
            total += check_len(
                &mut out,
                &p("author.name"),
                &e["author"]["name"],
                limits::EMBED_AUTHOR,
            );
            if let Some(fields) = e["fields"].as_array() {
                check_count(
                    &mut out,
                    &p("fields"),
                    &e["fields"],
                    0,
                    limits::EMBED_FIELDS,
                );
                for (j, f) in fields.iter().enumerate() {
                    total += check_len(
                        &mut out,
                        &p(&format!("fields.{j}.name")),
                        &f["name"],
                        limits::EMBED_FIELD_NAME,
                    );
                    total += check_len(
                        &mut out,
                        &p(&format!("fields.{j}.value")),
                        &f["value"],
                        limits::EMBED_FIELD_VALUE,
                    );
                    for k in ["name", "value"] {
                        if f[k].as_str().is_none_or(|s| s.trim().is_empty()) {
                            out.push(problem(
                                &p(&format!("fields.{j}.{k}")),
                                "BASE_TYPE_REQUIRED",
                                "This field is required".into(),
                            ));
                        }
                    }
                }
            }
        }
        if total > limits::EMBED_TOTAL {
            out.push(problem(
                "embeds",
                "MAX_EMBED_SIZE_EXCEEDED",
                format!(
                    "Embed size exceeds maximum size of {} (got {total}).",
                    limits::EMBED_TOTAL
                ),
            ));
        }
    }
    if body.get("components").is_some_and(|c| !c.is_null()) {
        validate_components(&mut out, &body["components"]);
    }
    let am = &body["allowed_mentions"];
    if am.is_object() {
        let parse: Vec<&str> = am["parse"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (kind, list) in [("users", &am["users"]), ("roles", &am["roles"])] {
            let n = list.as_array().map_or(0, Vec::len);
            if n > 0 && parse.contains(&kind) {
                out.push(problem(
                    &format!("allowed_mentions.{kind}"),
                    "ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                    format!("parse:[\"{kind}\"] and {kind}: [...] are mutually exclusive."),
                ));
            }
            if n > 100 {
                out.push(problem(
                    &format!("allowed_mentions.{kind}"),
                    "BASE_TYPE_MAX_LENGTH",
                    "Must be 100 or fewer in length.".into(),
                ));
            }
        }
    }
    if creating && out.is_empty() {
        let non_empty = |k: &str| match &body[k] {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        let has_attachments = has_files || non_empty("attachments");
        if !(non_empty("content")
            || non_empty("embeds")
            || non_empty("components")
            || non_empty("sticker_ids")
            || has_attachments
            || body.get("poll").is_some_and(|p| !p.is_null()))
        {
            out.push(problem(
                "",
                "EMPTY_MESSAGE",
                "Cannot send an empty message".into(),
            ));
        }
    }
    out
}

pub(super) fn validate_components(out: &mut Vec<Problem>, rows: &Value) {
    check_count(out, "components", rows, 0, limits::ACTION_ROWS);
    let mut seen: Vec<String> = Vec::new();
    for (i, row) in rows.as_array().into_iter().flatten().enumerate() {
        let rp = format!("components.{i}");
        if row["type"].as_u64() != Some(1) {
            out.push(problem(
                &rp,
                "COMPONENT_LAYOUT_INVALID",
                "Top-level components must be action rows (type 1).".into(),
            ));
            continue;
        }
        let comps = row["components"].as_array().cloned().unwrap_or_default();
        let has_select = comps
            .iter()
            .any(|c| matches!(c["type"].as_u64(), Some(3 | 5..=8)));
        let max = if has_select { 1 } else { limits::ROW_BUTTONS };
        check_count(out, &format!("{rp}.components"), &row["components"], 1, max);
        for (j, c) in comps.iter().enumerate() {
            let cp = format!("{rp}.components.{j}");
            if let Some(id) = c["custom_id"].as_str() {
                check_len(
                    out,
                    &format!("{cp}.custom_id"),
                    &c["custom_id"],
                    limits::CUSTOM_ID,
                );
                if id.is_empty() {
                    out.push(problem(
                        &format!("{cp}.custom_id"),
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.".into(),
                    ));
                }
                if seen.iter().any(|s| s == id) {
                    out.push(problem(
                        &format!("{cp}.custom_id"),
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        format!("Component custom id {id:?} cannot be duplicated."),
                    ));
                }
                seen.push(id.to_string());
            }
            match c["type"].as_u64() {
                Some(2) => {
                    check_len(
                        out,
                        &format!("{cp}.label"),
                        &c["label"],
                        limits::BUTTON_LABEL,
                    );
                    let style = c["style"].as_u64().unwrap_or(0);
                    let ok = match style {
                        1..=4 => c["custom_id"].is_string() && c["url"].is_null(),
                        5 => c["url"].is_string() && c["custom_id"].is_null(),
                        6 => c["sku_id"].is_string() || c["sku_id"].is_number(),
                        _ => false,
                    };
                    if !ok {
                        out.push(problem(&cp, "BUTTON_COMPONENT_INVALID",
                            format!("Button style {style} needs exactly one of custom_id (styles 1-4) or url (style 5).")));
                    }
                }
                Some(3 | 5..=8) => {
                    if !c["custom_id"].is_string() {
                        out.push(problem(
                            &format!("{cp}.custom_id"),
                            "BASE_TYPE_REQUIRED",
                            "This field is required".into(),
                        ));
                    }
                    check_len(
                        out,
                        &format!("{cp}.placeholder"),
                        &c["placeholder"],
                        limits::SELECT_PLACEHOLDER,
                    );
                    if c["type"].as_u64() == Some(3) {
                        check_count(
                            out,
                            &format!("{cp}.options"),
                            &c["options"],
                            1,
                            limits::SELECT_OPTIONS,
                        );
                    }
                }
                other => out.push(problem(
                    &cp,
                    "COMPONENT_TYPE_INVALID",
                    format!("Component type {other:?} is not allowed in a message action row."),
                )),
            }
        }
    }
}

pub(super) fn validate_modal(data: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    for (k, max) in [
        ("title", limits::MODAL_TITLE),
        ("custom_id", limits::CUSTOM_ID),
    ] {
        let n = check_len(&mut out, k, &data[k], max);
        if n == 0 {
            out.push(problem(
                k,
                "BASE_TYPE_REQUIRED",
                "This field is required".into(),
            ));
        }
    }
    check_count(&mut out, "components", &data["components"], 1, 5);
    for (i, row) in data["components"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let rp = format!("components.{i}");
        check_count(
            &mut out,
            &format!("{rp}.components"),
            &row["components"],
            1,
            1,
        );
        for (j, c) in row["components"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cp = format!("{rp}.components.{j}");
            if row["type"].as_u64() != Some(1) || c["type"].as_u64() != Some(4) {
                out.push(problem(
                    &cp,
                    "COMPONENT_LAYOUT_INVALID",
                    "Modals take action rows holding one text input (type 4).".into(),
                ));
                continue;
            }
            if check_len(
                &mut out,
                &format!("{cp}.label"),
                &c["label"],
                limits::TEXT_INPUT_LABEL,
            ) == 0
            {
                out.push(problem(
                    &format!("{cp}.label"),
                    "BASE_TYPE_REQUIRED",
                    "This field is required".into(),
                ));
            }
            if check_len(
                &mut out,
                &format!("{cp}.custom_id"),
                &c["custom_id"],
                limits::CUSTOM_ID,
            ) == 0
            {
                out.push(problem(
                    &format!("{cp}.custom_id"),
                    "BASE_TYPE_REQUIRED",
                    "This field is required".into(),
                ));
            }
            check_len(
                &mut out,
                &format!("{cp}.placeholder"),
                &c["placeholder"],
                limits::TEXT_INPUT_PLACEHOLDER,
            );
            check_len(
                &mut out,
                &format!("{cp}.value"),
                &c["value"],
                limits::TEXT_INPUT_VALUE,
            );
            if !matches!(c["style"].as_u64(), Some(1 | 2)) {
                out.push(problem(
                    &format!("{cp}.style"),
                    "BASE_TYPE_CHOICES",
                    "Value must be one of {1, 2}.".into(),
                ));
            }
        }
    }
    out
}

pub(super) fn valid_command_name(name: &str) -> bool {
    let n = name.chars().count();
    (1..=limits::COMMAND_NAME).contains(&n)
        && name.chars().all(|c| {
            c == '-' || c == '_' || c.is_numeric() || (c.is_alphabetic() && !c.is_uppercase())
        })
}

pub(super) fn validate_options(out: &mut Vec<Problem>, path: &str, options: &Value) {
    check_count(out, path, options, 0, limits::COMMAND_OPTIONS);
    let mut optional_seen = false;
    for (i, o) in options.as_array().into_iter().flatten().enumerate() {
        let op = format!("{path}.{i}");
        if !valid_command_name(o["name"].as_str().unwrap_or("")) {
            out.push(problem(
                &format!("{op}.name"),
                "APPLICATION_COMMAND_INVALID_NAME",
                format!("Invalid option name {:?}.", o["name"]),
            ));
        }
        let d = o["description"].as_str().map_or(0, |s| s.chars().count());
        if !(1..=limits::COMMAND_DESCRIPTION).contains(&d) {
            out.push(problem(
                &format!("{op}.description"),
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 100 in length.".into(),
            ));
        }
        let kind = o["type"].as_u64().unwrap_or(0);
        if matches!(kind, 1 | 2) {
            validate_options(out, &format!("{op}.options"), &o["options"]);
        } else {
            let required = o["required"].as_bool().unwrap_or(false);
            if required && optional_seen {
                out.push(problem(
                    &op,
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options.".into(),
                ));
            }
            optional_seen |= !required;
        }
        if o["choices"].is_array() {
            check_count(out, &format!("{op}.choices"), &o["choices"], 0, 25);
        }
    }
}

pub(super) fn validate_commands(list: &[Value]) -> Vec<Problem> {
    let mut out = Vec::new();
    if list.len() > 100 {
        out.push(problem(
            "",
            "BASE_TYPE_MAX_LENGTH",
            "Must be 100 or fewer in length.".into(),
        ));
    }
    let mut names: Vec<(u64, String)> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let kind = c["type"].as_u64().unwrap_or(1);
        let name = c["name"].as_str().unwrap_or("").to_string();
        if kind == 1 && !valid_command_name(&name) {
            out.push(problem(
                &format!("{i}.name"),
                "APPLICATION_COMMAND_INVALID_NAME",
                format!("Invalid command name {name:?}."),
            ));
        }
        let d = c["description"].as_str().map_or(0, |s| s.chars().count());
        if kind == 1 && !(1..=limits::COMMAND_DESCRIPTION).contains(&d) {
            out.push(problem(
                &format!("{i}.description"),
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 100 in length.".into(),
            ));
        }
        if names.contains(&(kind, name.clone())) {
            out.push(problem(
                &format!("{i}.name"),
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                format!("Command name {name:?} is already used."),
            ));
        }
        names.push((kind, name));
        if c["options"].is_array() {
            validate_options(&mut out, &format!("{i}.options"), &c["options"]);
        }
    }
    out
}

pub(super) fn insert_error(errors: &mut Map<String, Value>, path: &str, code: &str, message: &str) {
    let mut cur = errors;
    for key in path.split('.').filter(|k| !k.is_empty()) {
        let entry = cur.entry(key.to_string()).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        cur = match entry.as_object_mut() {
            Some(m) => m,
            None => return,
        };
    }
    let list = cur.entry("_errors").or_insert_with(|| json!([]));
    if let Some(a) = list.as_array_mut() {
        a.push(json!({"code": code, "message": message}));
    }
}
