//! The HTTP gateway's OpenAPI 3.1 document, generated rather than written: the paths from the
//! gateway's route table (a list of [`Route`]s), the schemas from the `vow.v1` proto
//! descriptors in the protobuf JSON mapping the gateway speaks (pbjson: lowerCamelCase, 64-bit
//! integers as strings, bytes as base64, enums by name, unknown fields refused). A field added to
//! the proto or a route added to the table is in the document without anyone editing it.

use axum::http::Method;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value as Json, json};

/// Where a route parameter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
}

/// A route parameter, for the OpenAPI document.
#[derive(Debug)]
pub struct Param {
    pub name: &'static str,
    pub location: In,
    /// A JSON Schema type name.
    pub ty: &'static str,
    pub description: &'static str,
    /// May be given more than once.
    pub repeated: bool,
}

/// One served route: what the OpenAPI document says about it. The handler is attached in
/// `gateway::router` by `operation_id`, and a test checks that both lists agree.
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    /// In OpenAPI and axum syntax alike (`{id}`).
    pub path: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    /// The `vow.v1` message the JSON body holds, if the route takes one (an empty body is that
    /// message with every field at its default).
    pub request: Option<&'static str>,
    /// The `vow.v1` message of a successful reply.
    pub response: &'static str,
    pub params: &'static [Param],
    /// Success statuses.
    pub ok: &'static [u16],
    /// Error statuses (each with an `Error` body).
    pub errors: &'static [u16],
}

const PACKAGE: &str = "vow.v1";

/// The whole document.
pub fn document(routes: &[Route]) -> Json {
    let mut schemas = Map::new();
    // The descriptors are compiled into vow-api; failing to read them is a build defect, and
    // the document then carries the paths without schemas rather than taking the node down.
    let set = FileDescriptorSet::decode(vow_api::FILE_DESCRIPTOR_SET).unwrap_or_default();
    for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
        for message in &file.message_type {
            message_schemas(message, &mut schemas);
        }
        for e in &file.enum_type {
            let names: Vec<&str> = e.value.iter().map(|v| v.name()).collect();
            schemas.insert(e.name().into(), json!({ "type": "string", "enum": names }));
        }
    }
    // The gateway's convenience: in a request, a Value's `text` (UTF-8) may stand for `data`.
    if let Some(Json::Object(value)) = schemas.get_mut("Value").and_then(|v| v.get_mut("properties")) {
        value.insert(
            "text".into(),
            json!({ "type": "string", "description": "Requests only: the data as UTF-8 text instead of base64 `data`." }),
        );
    }
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": { "type": "string", "description": "The gRPC status code's name, e.g. NOT_FOUND." },
                "message": { "type": "string" },
                "current": {
                    "$ref": "#/components/schemas/Promise",
                    "description": "On ALREADY_EXISTS and FAILED_PRECONDITION: the record as it is."
                },
                "currentTrimmed": {
                    "type": "boolean",
                    "description": "`current` leaves out param, value and tags (a large record); GET returns it whole."
                },
                "outcomeUnknown": {
                    "type": "boolean",
                    "description": "The write may or may not have taken effect: retry with the same idempotency key."
                }
            }
        }),
    );
    let mut paths = Map::new();
    for route in routes {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method.as_str().to_ascii_lowercase()] = operation(route);
    }
    paths.insert(
        "/v1/openapi.json".into(),
        json!({ "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": { "200": { "description": "OK", "content": { "application/json": { "schema": { "type": "object" } } } } }
        }}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "vow HTTP gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The vow.v1 Promises API over HTTP/JSON. Bodies are the protobuf JSON mapping of \
                            the same messages as gRPC; in a Value, `text` (UTF-8) may stand for `data` (base64)."
        },
        "paths": paths,
        "components": { "schemas": schemas }
    })
}

fn operation(route: &Route) -> Json {
    let params: Vec<Json> = route
        .params
        .iter()
        .map(|p| {
            let item = json!({ "type": p.ty });
            let schema = if p.repeated { json!({ "type": "array", "items": item }) } else { item };
            json!({
                "name": p.name,
                "in": if p.location == In::Path { "path" } else { "query" },
                "required": p.location == In::Path,
                "description": p.description,
                "schema": schema,
            })
        })
        .collect();
    let mut responses = Map::new();
    for status in route.ok {
        responses.insert(status.to_string(), json_content("OK", &schema_ref(route.response)));
    }
    for status in route.errors {
        let mut r = json_content(reason(*status), &schema_ref("Error"));
        if *status == 503 {
            r["headers"] = json!({ "Retry-After": { "schema": { "type": "integer" } } });
        }
        responses.insert(status.to_string(), r);
    }
    let mut op = json!({
        "operationId": route.operation_id,
        "summary": route.summary,
        "parameters": params,
        "responses": responses,
    });
    if let Some(request) = route.request {
        op["requestBody"] = json!({
            "required": false,
            "content": { "application/json": { "schema": schema_ref(request) } }
        });
    }
    op
}

fn json_content(description: &str, schema: &Json) -> Json {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error")
}

fn schema_ref(name: &str) -> Json {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The schema of `message` (and of the messages nested in it, map entries aside).
fn message_schemas(message: &DescriptorProto, out: &mut Map<String, Json>) {
    let mut properties = Map::new();
    for field in &message.field {
        properties.insert(json_name(field), field_schema(field, message));
    }
    out.insert(
        message.name().into(),
        json!({ "type": "object", "properties": properties, "additionalProperties": false }),
    );
    for nested in message.nested_type.iter().filter(|n| !is_map_entry(n)) {
        message_schemas(nested, out);
    }
}

fn is_map_entry(m: &DescriptorProto) -> bool {
    m.options.as_ref().is_some_and(|o| o.map_entry())
}

fn json_name(field: &FieldDescriptorProto) -> String {
    match &field.json_name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => lower_camel(field.name()),
    }
}

fn lower_camel(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn field_schema(field: &FieldDescriptorProto, parent: &DescriptorProto) -> Json {
    if field.r#type() == Type::Message
        && let Some(entry) = parent
            .nested_type
            .iter()
            .find(|n| is_map_entry(n) && field.type_name().ends_with(&format!(".{}", n.name())))
    {
        let value = entry.field.iter().find(|f| f.number() == 2).map_or_else(|| json!({}), scalar_schema);
        return json!({ "type": "object", "additionalProperties": value });
    }
    let one = scalar_schema(field);
    if field.label() == Label::Repeated { json!({ "type": "array", "items": one }) } else { one }
}

fn scalar_schema(field: &FieldDescriptorProto) -> Json {
    match field.r#type() {
        Type::Double | Type::Float => json!({ "type": "number" }),
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]+$" })
        }
        Type::Uint64 | Type::Fixed64 => json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" }),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
        Type::Uint32 | Type::Fixed32 => json!({ "type": "integer", "format": "uint32", "minimum": 0 }),
        Type::Bool => json!({ "type": "boolean" }),
        Type::String => json!({ "type": "string" }),
        Type::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Type::Enum | Type::Message | Type::Group => {
            let name = field.type_name().rsplit('.').next().unwrap_or_default();
            schema_ref(name)
        }
    }
}
