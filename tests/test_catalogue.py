"""The fleet's models, from backend states built in a known state (no polling)."""

from __future__ import annotations

import unittest

from fleet import make_registry
from llamacpp_ha import catalogue
from llamacpp_ha.registry import Health


class CatalogueTest(unittest.TestCase):
    def test_one_model_everywhere_accepts_any_name(self) -> None:
        backends = make_registry(("a", 1, ("m",)), ("b", 1, ("m",))).backends
        self.assertTrue(catalogue.single_model(backends))
        self.assertEqual(catalogue.serving(backends, "made-up"), backends)
        self.assertFalse(catalogue.knows_model(backends, "made-up"))

    def test_mixed_fleet_routes_by_name(self) -> None:
        backends = make_registry(("a", 1, ("x",)), ("b", 1, ("y", "z"))).backends
        self.assertFalse(catalogue.single_model(backends))
        self.assertEqual(catalogue.serving(backends, "z"), [backends[1]])
        self.assertEqual(catalogue.serving(backends, "w"), [])
        self.assertEqual(catalogue.serving(backends, None), backends)
        self.assertTrue(catalogue.knows_model(backends, "y"))

    def test_model_list_is_the_union_of_the_ready_backends(self) -> None:
        registry = make_registry(("a", 1, ("x",)), ("b", 1, ("x", "y")), ("c", 1, ("w",)))
        registry.get("a").model_entries = ({"id": "x", "aliases": ["x", "ex"]},)
        registry.get("c").health = Health.LOADING
        listed = {m["id"]: m["aliases"] for m in catalogue.model_list(registry.backends)}
        self.assertEqual(listed, {"x": ["x", "ex"], "y": ["y"]})
        self.assertEqual(registry.model_list(), catalogue.model_list(registry.backends))
