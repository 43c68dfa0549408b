"""The bundled datasets (see LICENSE), installed as edgelora.demo_data so `edgelora demo` finds them."""
