"""The OpenAPI 3 description of /api/v1, served at /api/v1/openapi.json and checked by a test."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..phases import PHASES

_MAC = {"name": "mac", "in": "path", "required": True, "description": "MAC address in any common spelling "
        "(52:54:00:12:34:56, 52-54-00-12-34-56, 5254.0012.3456, 525400123456)", "schema": {"type": "string"}}
_ERRORS = {
    "400": {"$ref": "#/components/responses/Error"},
    "401": {"$ref": "#/components/responses/Error"},
}
_NOT_FOUND = {"404": {"$ref": "#/components/responses/Error"}}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _action(summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "description": "Refused with 403 when a browser sends it from another site (Sec-Fetch-Site, Origin) or "
                       "for a name not in `[server] origins` (Host).",
        "parameters": [_MAC],
        "responses": {"200": _json("Machine", "the machine, as it is now"), **_ERRORS, **_NOT_FOUND,
                      "403": {"$ref": "#/components/responses/Error"}},
    }}


def _reprovision() -> dict[str, Any]:
    operation = _action("Run the whole flow again on the machine's next boot (its disk may be wiped); with "
                        "now=true, boot it now through its BMC: next boot from the network (read back), power cycle")
    post = operation["post"]
    post["parameters"] = [_MAC, {"name": "now", "in": "query", "required": False,
                                 "schema": {"type": "boolean", "default": False}}]
    post["responses"]["200"] = {"description": "the machine, as it is now, and what its BMC did", "content": {
        "application/json": {"schema": {"allOf": [{"$ref": "#/components/schemas/Machine"}, {
            "type": "object", "properties": {"netboot": {"allOf": [{"$ref": "#/components/schemas/Netboot"}],
                                                         "nullable": True}}}]}}}}
    post["responses"]["502"] = _BMC_FAILED
    return operation


_BMC_FAILED = {"$ref": "#/components/responses/Error"}  # the BMC was unreachable, refused us, or answered an error


def _power() -> dict[str, Any]:
    power = {"description": "the power state", "content": {"application/json": {"schema": {
        "type": "object", "required": ["mac", "power"], "properties": {
            "mac": {"type": "string"}, "action": {"type": "string"},
            "power": {"oneOf": [{"type": "string", "enum": ["on", "off"]}, {"$ref": "#/components/schemas/Power"}],
                      "nullable": True}}}}}}
    return {
        "get": {"summary": "The machine's power state, read from its BMC now", "parameters": [_MAC],
                "responses": {"200": power, **_ERRORS, **_NOT_FOUND, "502": _BMC_FAILED}},
        "post": {"summary": "Power the machine on, off (hard), soft-off (ACPI shutdown) or cycle it, through its BMC",
                 "parameters": [_MAC],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["action"], "properties": {
                         "action": {"type": "string", "enum": ["on", "off", "soft-off", "cycle"]}}}}}},
                 "responses": {"200": power, **_ERRORS, **_NOT_FOUND, "403": {"$ref": "#/components/responses/Error"},
                               "502": _BMC_FAILED}},
    }


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "bootserver", "version": __version__,
                 "description": "Machines that netbooted from this server, their states and event logs. "
                                "Writes (POST) need `Authorization: Bearer TOKEN` (`[server] api_token`, else the one "
                                "the server made in data_dir/api_token) and a Host and Origin of `[server] origins`; "
                                "reads need it too when `[server] pages = \"token\"`."},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/machines": {"get": {
                "summary": "The machines seen, by MAC, a page at a time, optionally only those in some states",
                "parameters": [{"name": "state", "in": "query", "required": False, "style": "form",
                                "explode": False, "description": "states to list, comma-separated",
                                "schema": {"type": "array", "items": {"type": "string"}}},
                               {"name": "after", "in": "query", "required": False,
                                "description": "list the machines after this MAC (the last page's `next_after`)",
                                "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 500}}],
                "responses": {"200": _json("MachineList", "a page of machines, by MAC"), **_ERRORS},
            }},
            "/api/v1/machines/{mac}": {"get": {
                "summary": "One machine and its newest events",
                "parameters": [_MAC],
                "responses": {"200": _json("MachineWithEvents", "the machine"), **_ERRORS, **_NOT_FOUND},
            }},
            "/api/v1/machines/{mac}/events": {"get": {
                "summary": "A machine's events after an event id, oldest first (poll with the last id seen)",
                "parameters": [_MAC,
                               {"name": "after", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "default": 0}},
                               {"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000}}],
                "responses": {"200": _json("EventPage", "the events"), **_ERRORS, **_NOT_FOUND},
            }},
            "/api/v1/machines/{mac}/waterfall": {"get": {
                "summary": "A boot of the machine in phases (DHCP, TFTP, script, kernel, phone-home, disk, install, "
                           "deploy, reboot, booted, running): the latest, or the one `boot` names; and its other boots "
                           "among its newest events",
                "parameters": [_MAC, {"name": "boot", "in": "query", "required": False,
                                      "description": "a boot's id (its first event's id), from `boots`",
                                      "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": _json("Waterfall", "the boot's phases"), **_ERRORS, **_NOT_FOUND},
            }},
            "/api/v1/fleet": {"get": {
                "summary": "Every machine's latest boot: each phase's median, p90 and max with the slowest machines, "
                           "machines stuck in a phase for longer than its p90 x 3, failures by reason, and machines "
                           "by phase at the end of each minute of the last day",
                "parameters": [{"name": "group", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "only machines this [groups] entry picks now"},
                               {"name": "profile", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "only machines that boot this profile now"}],
                "responses": {"200": _json("Fleet", "the fleet's figures"), **_ERRORS},
            }},
            "/api/v1/machines/{mac}/reprovision": _reprovision(),
            "/api/v1/machines/{mac}/power": _power(),
            "/api/v1/deploy": {"post": {
                "summary": "Send machines (MACs, or [groups] names for their configured members) through the whole "
                           "flow: seen ones marked for reprovisioning, unseen ones approved; with `now`, each is "
                           "also netbooted through its BMC, at most [server] bmc_concurrency BMC calls at once",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["targets"], "properties": {
                        "targets": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                        "now": {"type": "boolean", "default": False}}}}}},
                "responses": {"200": {"description": "the machines and what their BMCs did", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "machines": {"type": "array", "items": {"type": "string"}},
                        "netboot": {"type": "array", "items": {"$ref": "#/components/schemas/Netboot"}}}}}}},
                              **_ERRORS, **_NOT_FOUND, "403": {"$ref": "#/components/responses/Error"}},
            }},
            "/api/v1/machines/{mac}/approve": _action(
                "Open the machine's provisioning window ([server] enroll) and let go of claims held in a conflict; "
                "a MAC not seen yet may be approved ahead of its first boot"),
            "/api/v1/machines/{mac}/boot-from-disk": _action(
                "Boot the machine's local disk from its next boot on, as if deployed"),
            "/api/v1/openapi.json": {"get": {
                "summary": "This description", "security": [{}],
                "responses": {"200": {"description": "OpenAPI 3 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": _json("Error", "what was wrong, in words")},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    nullable_string = {"type": "string", "nullable": True}
    return {
        "Error": {"type": "object", "required": ["error", "status"],
                  "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
        "Progress": {"type": "object", "required": ["state", "done", "total", "tone"], "properties": {
            "state": {"type": "string"},
            "done": {"type": "integer", "description": "position on script-served -> ... -> deployed; "
                                                       "0 when off that path (failed, interrupted)"},
            "total": {"type": "integer"},
            "tone": {"type": "string", "enum": ["ok", "busy", "bad", "idle"]},
        }},
        "Machine": {"type": "object", "required": ["mac", "state", "first_seen", "last_seen", "progress"],
                    "properties": {
                        "mac": {"type": "string", "example": "52:54:00:12:34:56"},
                        "state": {"type": "string"},
                        "first_seen": {"type": "number", "description": "Unix time"},
                        "last_seen": {"type": "number", "description": "Unix time"},
                        "facts": {"type": "object", "additionalProperties": {"type": "string"}},
                        "host_key_fingerprint": nullable_string,
                        "ip": nullable_string,
                        "reprovision": {"type": "boolean"},
                        "window_until": {"type": "number", "nullable": True,
                                         "description": "Unix time its provisioning window closes (enroll = approve)"},
                        "held": {"type": "string", "nullable": True,
                                 "description": "why its claims are held (two addresses claimed it); "
                                                "approve to release"},
                        "hostname": nullable_string,
                        "profile": nullable_string,
                        "group": nullable_string,
                        "reason": {"type": "string", "description": "why that group and profile matched"},
                        "progress": {"$ref": "#/components/schemas/Progress"},
                        "power": {"allOf": [{"$ref": "#/components/schemas/Power"}], "nullable": True,
                                  "description": "its last-seen power state; null without a BMC or before the "
                                                 "first poll"},
                        "phase": {"type": "string", "nullable": True,
                                  "description": "the phase its latest boot is in, or how that boot ended"},
                        "since": {"type": "number", "nullable": True, "description": "Unix time it got there"},
                        "boot_seconds": {"type": "number", "nullable": True,
                                         "description": "its latest boot's length (so far, while under way)"},
                        "last_event": {"type": "object", "nullable": True, "description": "its newest event",
                                       "properties": {"id": {"type": "integer"}, "kind": {"type": "string"},
                                                      "time": {"type": "number"}, "summary": {"type": "string"}}},
                    }},
        "Power": {"type": "object", "required": ["state", "checked"], "properties": {
            "state": {"type": "string", "enum": ["on", "off", "unknown"]},
            "checked": {"type": "number", "description": "Unix time"},
            "error": {"type": "string", "nullable": True, "description": "why the last BMC call failed"},
        }},
        "Netboot": {"type": "object", "required": ["mac", "boot_override"], "properties": {
            "mac": {"type": "string"},
            "boot_override": {"type": "string", "description": "kept, or why not (lost: read back otherwise; "
                                                               "failed: refused): the power cycle was sent anyway"},
            "error": {"type": "string", "nullable": True, "description": "the power cycle failed"},
        }},
        "MachineList": {"type": "object", "required": ["machines"], "properties": {
            "machines": {"type": "array", "items": {"$ref": "#/components/schemas/Machine"}},
            "next_after": {"type": "string", "nullable": True,
                           "description": "pass as `after` for the next page; null on the last page"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "machines by state, over all machines"},
        }},
        "Event": {"type": "object", "required": ["id", "mac", "time", "kind", "detail"], "properties": {
            "id": {"type": "integer"},
            "mac": {"type": "string"},
            "time": {"type": "number"},
            "kind": {"type": "string", "example": "file-served"},
            "detail": {"type": "object", "additionalProperties": True},
            "replica": {"type": "string", "nullable": True,
                        "description": "the bootserver (replica) that recorded it"},
            "summary": {"type": "string"},
            "tone": {"type": "string", "enum": ["ok", "info", "bad"]},
        }},
        "MachineWithEvents": {"allOf": [{"$ref": "#/components/schemas/Machine"}, {"type": "object", "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}}]},
        "Phase": {"type": "object", "required": ["phase", "start", "seconds"], "properties": {
            "phase": {"type": "string", "enum": list(PHASES)},
            "label": {"type": "string"},
            "start": {"type": "number", "description": "Unix time of its first event"},
            "seconds": {"type": "number", "description": "until the next phase started (so far, while under way)"},
            "events": {"type": "integer"},
            "bytes": {"type": "integer", "nullable": True, "description": "files served (OS written, install)"},
            "rate": {"type": "number", "nullable": True, "description": "bytes a second"},
            "failure": {"type": "string", "nullable": True, "description": "why the boot failed here"},
            "done": {"type": "boolean"},
        }},
        "Boot": {"type": "object", "required": ["id", "start", "seconds", "phases"], "properties": {
            "id": {"type": "integer", "description": "its first event's id"},
            "mac": {"type": "string"},
            "start": {"type": "number"},
            "seconds": {"type": "number"},
            "outcome": {"type": "string", "nullable": True, "enum": ["running", "deployed", "failed", "interrupted"],
                        "description": "null while under way"},
            "failure": {"type": "string", "nullable": True},
            "failed_in": {"type": "string", "nullable": True},
            "phases": {"type": "array", "items": {"$ref": "#/components/schemas/Phase"}},
        }},
        "Waterfall": {"type": "object", "required": ["mac", "boot", "boots"], "properties": {
            "mac": {"type": "string"},
            "boot": {"allOf": [{"$ref": "#/components/schemas/Boot"}], "nullable": True},
            "boots": {"type": "array", "description": "its boots among its newest events, newest first",
                      "items": {"type": "object", "properties": {
                          "id": {"type": "integer"}, "start": {"type": "number"}, "seconds": {"type": "number"},
                          "outcome": nullable_string, "failure": nullable_string}}},
        }},
        "Fleet": {"type": "object", "required": ["machines", "phases", "stuck", "failures", "series"], "properties": {
            "group": nullable_string,
            "profile": nullable_string,
            "machines": {"type": "integer", "description": "machines with a boot, among those asked for"},
            "phases": {"type": "array", "items": {"type": "object", "properties": {
                "phase": {"type": "string"}, "count": {"type": "integer"}, "median": {"type": "number"},
                "p90": {"type": "number"}, "max": {"type": "number"},
                "slowest": {"type": "array", "items": {"type": "object", "properties": {
                    "mac": {"type": "string"}, "seconds": {"type": "number"}}}}}}},
            "stuck": {"type": "array", "items": {"type": "object", "properties": {
                "mac": {"type": "string"}, "phase": {"type": "string"}, "seconds": {"type": "number"},
                "limit": {"type": "number"}}}},
            "failures": {"type": "array", "items": {"type": "object", "properties": {
                "reason": {"type": "string"}, "count": {"type": "integer"},
                "macs": {"type": "array", "items": {"type": "string"}, "description": "the first 20, by MAC"},
                "phases": {"type": "object", "additionalProperties": {"type": "integer"}}}}},
            "series": {"type": "array", "description": "every machine, by phase or outcome, at the end of each minute",
                       "items": {"type": "object", "properties": {
                           "time": {"type": "number"},
                           "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}}},
            "behind": {"type": "integer", "description": "events not read yet (the server is still reading its log)"},
            "stuck_factor": {"type": "integer"},
        }},
        "EventPage": {"type": "object", "required": ["mac", "events", "last_id"], "properties": {
            "mac": {"type": "string"},
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "last_id": {"type": "integer", "description": "pass as `after` to get only newer events"},
        }},
    }
