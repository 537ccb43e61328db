"""Custom ops (eager + fake implementations), their lowerings and the TensorRT plugin beside the op.

Files: moe.py (`m3::moe`: the definition every lowering is checked against), lowering.py (the
lowering interface and registry, shared routing ops), lowering_ort.py (`com.microsoft::MoE`),
lowering_portable.py (standard ONNX ops), lowering_trt.py (the plugin node), trt_signature.py (the
plugin's one signature), trt_plugin.py (the TensorRT Python plugin generated from it).
"""
