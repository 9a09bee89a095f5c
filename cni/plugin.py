"""flatnet CNI plugin: stub until the CNI issue."""



def main() -> int:
    print('{"cniVersion":"1.0.0","code":999,"msg":"not yet implemented"}')
    return 1
