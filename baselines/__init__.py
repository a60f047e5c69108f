"""Baseline methods, one module each, registered into `astra.methods` under their config names.

Nothing is imported here: `astra.methods.load_methods()` imports every module of this package, so a
new method is one module here plus its `conf/method/<name>.yaml`.
"""
