"""The one OpenAPI viewer: Swagger UI, at ``/schema`` and ``/schema/swagger``, with its
JavaScript, CSS and favicon served by the API itself from ``/schema/swagger-ui/`` (the files of
the ``swagger-ui-bundle-v2`` package, Swagger UI 5, Apache-2.0), so the page renders without
reaching a CDN: offline, behind a firewall, under a strict CSP. Litestar's other viewers
(ReDoc, Elements, RapiDoc, Scalar) load their scripts from CDNs, so they are not served.
The documents themselves: ``/schema/openapi.json``, ``/schema/openapi.yaml`` (and ``.yml``)."""

from __future__ import annotations

from litestar.openapi.plugins import OpenAPIRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path


def render_plugins(schema_path: str) -> list[OpenAPIRenderPlugin]:
    assets = f"{schema_path}/swagger-ui"
    swagger = SwaggerRenderPlugin(
        path=["/", "/swagger"],
        js_url=f"{assets}/swagger-ui-bundle.js",
        css_url=f"{assets}/swagger-ui.css",
        standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png'>",
    )
    return [swagger, YamlRenderPlugin()]  # openapi.json comes with every configuration


def assets_router(schema_path: str) -> Router:
    return create_static_files_router(path=f"{schema_path}/swagger-ui", directories=[str(swagger_ui_path)],
                                      include_in_schema=False, name="swagger-ui-assets")
