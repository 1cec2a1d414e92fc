//! The README's settings tables against the settings the daemons declare: every setting of
//! ferryd and ferry-cloud (`ferry_daemon::settings!`, one line each) has a table row naming its
//! config key, its flag and its variable, and every such row names a setting that exists. A
//! setting added, renamed or removed without its row fails here.

use std::collections::HashSet;

use ferry_integration::repo_root;

type Table = &'static [(&'static str, &'static str, &'static [&'static str])];

/// Every declared setting of both daemons: (flag, variable, config key).
fn declared() -> Vec<(String, &'static str, String)> {
    let tables: [Table; 4] = [
        ferry_edge::config::Settings::TABLE,
        ferry_edge::config::SharedSettings::TABLE,
        ferry_cloud::config::Settings::TABLE,
        ferry_cloud::config::SharedSettings::TABLE,
    ];
    tables
        .iter()
        .flat_map(|t| t.iter())
        .map(|(field, var, key)| {
            (
                format!("--{}", field.replace('_', "-")),
                *var,
                key.join("."),
            )
        })
        .collect()
}

/// The README's table rows (indented ones too: ferry-cloud's table sits in a list item).
fn readme_rows() -> Vec<String> {
    std::fs::read_to_string(repo_root().join("README.md"))
        .expect("README.md")
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(str::to_string)
        .collect()
}

/// The `FERRY_*` names in a row's flag/env column (the second cell), when that column holds one.
fn row_variables(row: &str) -> Vec<String> {
    let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
    let Some(flags) = cells.get(1) else {
        return Vec::new();
    };
    if !flags.contains("`--") {
        return Vec::new();
    }
    flags
        .split('`')
        .filter(|w| w.starts_with("FERRY_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_declared_setting_has_a_readme_row_with_its_key_flag_and_variable() {
    let rows = readme_rows();
    let missing: Vec<String> = declared()
        .into_iter()
        .filter(|(flag, var, key)| {
            // A row may document two keys at once: `a`, `b` | `--a`, `--b` / `A`, `B`.
            !rows.iter().any(|r| {
                [format!("`{key}`"), format!("`{flag}`"), format!("`{var}`")]
                    .iter()
                    .all(|needle| r.contains(needle.as_str()))
            })
        })
        .map(|(flag, var, key)| format!("{key} ({flag} / {var})"))
        .collect();
    assert!(
        missing.is_empty(),
        "settings without a README row naming key, flag and variable: {missing:?}"
    );
}

#[test]
fn every_readme_settings_row_names_a_declared_variable() {
    let mut known: HashSet<String> = declared().into_iter().map(|d| d.1.to_string()).collect();
    // Flags declared outside the settings tables: the config file itself, and ferryd's
    // endpoint list (a comma-separated list, not a scalar setting).
    known.extend(
        [
            "FERRY_CONFIG",
            "FERRY_CLOUD_CONFIG",
            "FERRY_CLOUD_ENDPOINTS",
        ]
        .map(String::from),
    );
    let unknown: Vec<String> = readme_rows()
        .iter()
        .flat_map(|r| row_variables(r))
        .filter(|v| !known.contains(v))
        .collect();
    assert!(
        unknown.is_empty(),
        "README rows name variables no daemon declares: {unknown:?}"
    );
}
