//! The JSON Schema of pipeline files, generated from the Rust types (for Taplo / Even Better TOML).

use serde_json::{json, Value as Json};

use super::PipelineFileShape;
use crate::stage::Registry;

/// The schema of a pipeline file accepting the stage kinds in `registry`.
pub fn pipeline_schema(registry: &Registry) -> Json {
    let root = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<PipelineFileShape>();
    let mut root = serde_json::to_value(root).expect("schema is JSON");
    root["title"] = json!("saeflow pipeline");
    root["description"] = json!("A saeflow pipeline file (TOML). See DESIGN.md / README.md.");
    let mut resources =
        serde_json::to_value(schemars::schema_for!(super::Resources)).expect("schema is JSON");
    resources.as_object_mut().expect("object").remove("$schema");
    resources["description"] = json!(
        "Scheduler resources for this stage's jobs with `--executor slurm` (not part of any key)."
    );
    let mut variants = Vec::new();
    for kind in registry.kinds() {
        let mut schema = serde_json::to_value(kind.schema()).expect("schema is JSON");
        if let Some(Json::Object(defs)) = schema.as_object_mut().and_then(|s| s.remove("$defs")) {
            let root_defs = root
                .as_object_mut()
                .expect("object")
                .entry("$defs")
                .or_insert_with(|| json!({}));
            for (name, def) in defs {
                let slot = root_defs
                    .as_object_mut()
                    .expect("object")
                    .entry(name.clone())
                    .or_insert(def.clone());
                assert_eq!(
                    *slot, def,
                    "two stage kinds define different `{name}` schemas"
                );
            }
        }
        let obj = schema.as_object_mut().expect("object schema");
        obj.remove("$schema");
        obj.insert(
            "title".into(),
            json!(format!("stage kind `{}`", kind.kind())),
        );
        obj.insert("description".into(), json!(kind.about()));
        obj.entry("properties").or_insert_with(|| json!({}))["kind"] =
            json!({ "const": kind.kind(), "description": kind.about() });
        obj["properties"]["resources"] = resources.clone();
        let required = obj.entry("required").or_insert_with(|| json!([]));
        required
            .as_array_mut()
            .expect("array")
            .insert(0, json!("kind"));
        variants.push(schema);
    }
    root["properties"]["stages"] = json!({
        "description": "Stages by name: [stages.NAME] with `kind` and the kind's parameters.",
        "type": "object",
        "minProperties": 1,
        "propertyNames": { "pattern": "^[A-Za-z0-9_-]+$" },
        "additionalProperties": { "oneOf": variants },
    });
    root["required"]
        .as_array_mut()
        .expect("required list")
        .push(json!("stages"));
    root
}
